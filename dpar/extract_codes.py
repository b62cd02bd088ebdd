"""`python -m dpar.extract_codes`: alias of `python -m dpar extract-codes` (code: dpar.pipeline.extract_codes)."""
import sys

if __name__ == "__main__":
    from dpar.__main__ import main
    main(["extract-codes", *sys.argv[1:]])
