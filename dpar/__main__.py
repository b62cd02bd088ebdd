"""`python -m dpar <command>`: train, patchify, sample, evaluate, extract-codes, demo, ablate (each has --help)."""
import argparse
import copy
import importlib
import os
import sys

COMMANDS = {
    "train": ("train", "train an entropy model, DPAR or the LlamaGen baseline on a token dataset"),
    "patchify": ("patchify", "precompute entropies and patches of a dataset with a trained entropy model"),
    "sample": ("sample", "sample class-conditional image grids and entropy / patch maps to PNG"),
    "evaluate": ("evaluate", "reduction, held-out NLL, FLOPs to a target loss, FID"),
    "extract-codes": ("extract_codes", "encode an ImageFolder tree into a token dataset with a LlamaGen VQ-16"),
    "demo": ("demo", "the whole pipeline on photos shipped with scikit-image, with a markdown report"),
    "ablate": ("ablate", "DPAR vs static patches vs the baseline at equal training FLOPs, with held-out curves"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (not None or False ones) and keeps the module docstrings' line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)

    def _format_action(self, action):
        if action.help is None and action.option_strings and action.default not in (None, False):
            action = copy.copy(action)  # an option without help text still shows its default
            action.help = "default: %(default)s"
        return super()._format_action(action)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or environment: one `error:` line, exit 2 (DPAR_DEBUG=1: traceback)."""
    from dpar_kernels import BackendUnavailableError
    return ValueError, OSError, ImportError, BackendUnavailableError


def build_parser() -> argparse.ArgumentParser:
    from dpar_kernels import __version__
    parser = argparse.ArgumentParser(prog="python -m dpar", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"dpar-kernels {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"dpar.pipeline.{module_name}")
        module.add_arguments(commands.add_parser(name, help=help_text, description=module.__doc__,
                                                 formatter_class=HelpFormatter))
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        importlib.import_module(f"dpar.pipeline.{COMMANDS[args.command][0]}").main(args)
    except user_errors() as error:
        if os.environ.get("DPAR_DEBUG") == "1":
            raise
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
