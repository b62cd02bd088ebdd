"""`python -m dpar <command>`: train, patchify, sample, evaluate, demo (each has --help)."""
import argparse
import importlib

COMMANDS = {
    "train": ("train", "train an entropy model, DPAR or the LlamaGen baseline on a token dataset"),
    "patchify": ("patchify", "precompute entropies and patches of a dataset with a trained entropy model"),
    "sample": ("sample", "sample class-conditional image grids and entropy / patch maps to PNG"),
    "evaluate": ("evaluate", "reduction, held-out NLL, FLOPs to a target loss, FID"),
    "demo": ("demo", "the whole pipeline on photos shipped with scikit-image, with a markdown report"),
    "ablate": ("ablate", "DPAR vs static patches vs the baseline at equal training FLOPs, with held-out curves"),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpar", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"dpar.pipeline.{module_name}")
        module.add_arguments(commands.add_parser(name, help=help_text, description=module.__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    importlib.import_module(f"dpar.pipeline.{COMMANDS[args.command][0]}").main(args)


if __name__ == "__main__":
    main()
