"""`python -m dpar.train`: alias of `python -m dpar train` (the code is in dpar.pipeline.train)."""
import sys

if __name__ == "__main__":
    from dpar.__main__ import main
    main(["train", *sys.argv[1:]])
