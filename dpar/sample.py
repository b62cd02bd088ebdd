"""`python -m dpar.sample`: alias of `python -m dpar sample` (the code is in dpar.pipeline.sample)."""
import sys

if __name__ == "__main__":
    from dpar.__main__ import main
    main(["sample", *sys.argv[1:]])
