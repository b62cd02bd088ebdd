"""`python -m dpar.ablate`: alias of `python -m dpar ablate` (the code is in dpar.pipeline.ablate)."""
import sys

if __name__ == "__main__":
    from dpar.__main__ import main
    main(["ablate", *sys.argv[1:]])
