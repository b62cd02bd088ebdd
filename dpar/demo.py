"""`python -m dpar.demo`: alias of `python -m dpar demo` (the code is in dpar.pipeline.demo)."""
import sys

if __name__ == "__main__":
    from dpar.__main__ import main
    main(["demo", *sys.argv[1:]])
