"""`python -m dpar.patchify`: alias of `python -m dpar patchify` (the code is in dpar.pipeline.patchify)."""
import sys

if __name__ == "__main__":
    from dpar.__main__ import main
    main(["patchify", *sys.argv[1:]])
