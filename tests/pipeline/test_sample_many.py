"""`dpar sample --num-images N --batch-size B`: continuous batching into a folder of codes, resumable, with each
image's codes independent of B and equal to a batch of one with that image's seed."""
import dataclasses

import pytest
import torch

import dpar
from dpar.__main__ import main as dpar_main
from dpar.pipeline.checkpoint import save_checkpoint
from dpar.pipeline.sample_many import CODES, image_seed, read_codes, sample_many


def _tiny(seed=0):
    torch.manual_seed(seed)
    config = dpar.get_config("tiny", num_heads=2, num_kv_heads=2)
    entropy_config = dpar.get_config("entropy-tiny", vocab_size=config.vocab_size, grid_height=config.grid_height,
                                     grid_width=config.grid_width)
    return config, dpar.DPAR(config).eval(), dpar.EntropyModel(entropy_config).eval(), entropy_config


@pytest.fixture
def checkpoints(tmp_path):
    config, model, entropy_model, entropy_config = _tiny()
    paths = tmp_path / "dpar.safetensors", tmp_path / "entropy.safetensors"
    save_checkpoint(str(paths[0]), kind="dpar", config=dataclasses.asdict(config), step=0, model=model)
    save_checkpoint(str(paths[1]), kind="entropy", config=dataclasses.asdict(entropy_config), step=0,
                    model=entropy_model)
    return [str(p) for p in paths]


def _threshold(config, entropy_model):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (4, config.tokens_per_image), generator=generator)
    return float(entropy_model.entropies(tokens).double().median())


def test_codes_do_not_depend_on_the_batch_size_and_match_single_images(tmp_path):
    config, model, entropy_model, _ = _tiny()
    knobs = dict(entropy_model=entropy_model, threshold=_threshold(config, entropy_model), max_patch_size=3,
                 cfg_scale=2.0, temperature=1.0, top_k=20, progress=False)
    labels = [3, 1, 4]
    runs = {}
    for batch in (1, 3, 4):
        summary = sample_many(model, labels, num_images=7, batch_size=batch, out=str(tmp_path / f"b{batch}"),
                              seed=5, **knobs)
        assert summary["images"] == 7 and summary["images_per_s"] > 0
        assert 1 < summary["global_tokens_per_image"] < config.tokens_per_image + 1
        assert summary["local_steps_per_image"] >= config.tokens_per_image / batch
        runs[batch] = read_codes(str(tmp_path / f"b{batch}"), config.tokens_per_image)
    assert sorted(runs[3]) == list(range(7))
    for i in range(7):
        assert runs[1][i][0] == labels[i % 3]
        for batch in (3, 4):
            assert runs[batch][i][1] == runs[1][i][1] and (runs[batch][i][2] == runs[1][i][2]).all()
    alone = model.generate(torch.tensor([labels[6 % 3]]), generator=torch.Generator().manual_seed(image_seed(5, 6)),
                           **{k: v for k, v in knobs.items() if k != "progress"})
    assert (torch.from_numpy(runs[4][6][2]).long() == alone[0]).all()


def test_a_killed_run_resumes_and_keeps_what_it_wrote(tmp_path):
    config, model, entropy_model, _ = _tiny(seed=1)
    knobs = dict(entropy_model=entropy_model, threshold=_threshold(config, entropy_model), max_patch_size=2,
                 temperature=1.0, progress=False)
    full = tmp_path / "full"
    sample_many(model, [0, 1], num_images=5, batch_size=2, out=str(full), **knobs)
    killed = tmp_path / "killed"
    sample_many(model, [0, 1], num_images=3, batch_size=2, out=str(killed), **knobs)  # images 0-2 written
    (killed / "run.json").write_text((full / "run.json").read_text())  # the same run, stopped after 3 images
    record = (full / CODES).read_bytes()[: 4 * (3 + config.tokens_per_image)]
    with open(killed / CODES, "ab") as f:
        f.write(record[:10])  # a partial record, as a kill mid-write leaves
    summary = sample_many(model, [0, 1], num_images=5, batch_size=2, out=str(killed), **knobs)
    assert summary["images"] == 2  # only images 3 and 4 were left
    expected, resumed = (read_codes(str(p), config.tokens_per_image) for p in (full, killed))
    assert sorted(resumed) == list(range(5))
    assert all((resumed[i][2] == expected[i][2]).all() for i in range(5))
    with pytest.raises(ValueError, match="labels must be"):
        sample_many(model, [0, config.num_classes], num_images=1, batch_size=1, out=str(tmp_path / "bad"), **knobs)
    with pytest.raises(ValueError, match="other settings"):
        sample_many(model, [0, 1], num_images=5, batch_size=2, out=str(killed), seed=9, **knobs)


def test_the_sample_command_runs_continuous_batching(checkpoints, tmp_path, capsys):
    out = tmp_path / "codes"
    common = ["sample", "--ckpt", checkpoints[0], "--entropy-ckpt", checkpoints[1], "--threshold", "3.5",
              "--num-images", "5", "--batch-size", "2", "--out", str(out), "--device", "cpu"]
    dpar_main(common)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("5 images in") and "images/s" in line and "global steps" in line, line
    assert len(read_codes(str(out), 16)) == 5
    dpar_main(common)  # nothing left to sample
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("0 images in")
    with pytest.raises(SystemExit):
        dpar_main(["sample", "--ckpt", checkpoints[0], "--num-images", "3", "--out", str(tmp_path / "x"),
                   "--device", "cpu"])
    assert "needs --entropy-ckpt and --threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dpar_main([*common[:-4], "--batch-size", "0", "--out", str(tmp_path / "y"), "--device", "cpu"])
    assert "batch_size must be an int >= 1" in capsys.readouterr().err
