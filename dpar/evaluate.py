"""`python -m dpar.evaluate`: alias of `python -m dpar evaluate` (the code is in dpar.pipeline.evaluate)."""
import sys

if __name__ == "__main__":
    from dpar.__main__ import main
    main(["evaluate", *sys.argv[1:]])
