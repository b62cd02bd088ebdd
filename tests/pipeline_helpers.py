"""Shared helpers of the pipeline tests: a small random token dataset and train-argument parsing."""
import argparse

import torch

from dpar.pipeline import data, train

# head_dim 32 (a size every varlen_attention backend supports)
TINY_OVERRIDES = ["num_heads=2", "num_kv_heads=2"]


def write_random_dataset(root, count=32, grid=4, vocab=16, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, vocab, (count, grid, grid), generator=generator)
    labels = torch.arange(count) % classes
    data.write_token_dataset(str(root), codes, labels, vocab, classes)
    return codes, labels


def train_args(argv, overrides=()):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv] + ["--quiet", "--device", "cpu", "--override", *TINY_OVERRIDES,
                                                       *overrides])
