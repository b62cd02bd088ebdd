"""`dpar evaluate`: tokens per image and reduction, held-out NLL per token, training FLOPs to a target loss, FID.

FID: ``frechet_distance`` / ``fid`` work with any feature extractor (images float [B, 3, H, W] in [0, 1] ->
features [B, F]); the standard Inception-v3 extractor comes from torch-fidelity and only from local weights
(``inception_extractor``), never from a download. On the real path, ``--fid N --ckpt ... --vq-ckpt ...`` writes N
class-balanced samples decoded by the LlamaGen VQ as PNGs (--fid-out) and compares them with --fid-ref: an image
folder (torch-fidelity's calculate_metrics) or a statistics .npz with ``mu`` / ``sigma`` (ADM's reference batches);
--fid-extractor module:factory (your own feature extractor) replaces Inception-v3, e.g. where torch-fidelity is
not installed.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from .runlog import read_log

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def patch_statistics(patch_lengths: torch.Tensor, cu_patches: torch.Tensor, tokens_per_image: int) -> dict:
    """Global tokens per image (mean, min, max) and reduction T / mean patches vs the fixed grid."""
    per_image = (cu_patches[1:] - cu_patches[:-1]).double()
    mean = float(per_image.mean()) if per_image.numel() else 0.0
    return {"tokens_per_image": tokens_per_image, "patches_per_image": mean,
            "patches_min": int(per_image.min()) if per_image.numel() else 0,
            "patches_max": int(per_image.max()) if per_image.numel() else 0,
            "reduction": tokens_per_image / mean if mean else float("nan"),
            "mean_patch_length": float(patch_lengths.double().mean()) if patch_lengths.numel() else 0.0}


def flops_to_target(records: list[dict], target: float, key: str = "loss", smoothing: int = 1) -> float | None:
    """Cumulative training FLOPs at the first step whose ``key`` (averaged over the last ``smoothing`` records that
    have it) is <= target; None when the run never gets there."""
    window = []
    for record in records:
        if key not in record:
            continue
        window = (window + [record[key]])[-smoothing:]
        if len(window) == smoothing and sum(window) / smoothing <= target:
            return float(record["cum_flops"])
    return None


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric PSD matrix (no complex sqrtm needed).
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    root = _sqrt_psd(sigma1)
    cross = torch.linalg.eigvalsh(root @ sigma2 @ root).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features [N, F] -> (mean [F], covariance [F, F]) in float64 (unbiased, as pytorch-fid / torch-fidelity)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, F], got {tuple(features.shape)}")
    features = features.double()
    return features.mean(0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


@torch.no_grad()
def extract_features(images: torch.Tensor, extractor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([extractor(images[i:i + batch_size]).reshape(len(images[i:i + batch_size]), -1).double()
                      for i in range(0, len(images), batch_size)])


def fid(images_a: torch.Tensor, images_b: torch.Tensor, extractor=None, batch_size: int = 64) -> float:
    """FID between two image sets float [N, 3, H, W] in [0, 1]; ``extractor`` defaults to local Inception-v3."""
    extractor = extractor or inception_extractor()
    return frechet_distance(*feature_statistics(extract_features(images_a, extractor, batch_size)),
                            *feature_statistics(extract_features(images_b, extractor, batch_size)))


def inception_weights_path(weights_path: str | None = None) -> str:
    """``weights_path``, else $DPAR_INCEPTION_WEIGHTS, else torch hub's checkpoints folder; RuntimeError saying how
    to get the file when it does not exist (nothing is downloaded)."""
    path = weights_path or os.environ.get("DPAR_INCEPTION_WEIGHTS") or os.path.join(
        torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)
    if not os.path.isfile(path):
        raise RuntimeError(f"Inception weights not found at {path}. Download {INCEPTION_WEIGHTS} from the "
                           "torch-fidelity releases on a machine with internet access and pass its path with "
                           "--inception-weights or $DPAR_INCEPTION_WEIGHTS")
    return path


def inception_extractor(weights_path: str | None = None):
    """torch-fidelity's Inception-v3 pool features (2048) from local weights: images [B, 3, H, W] in [0, 1].

    Weights: see ``inception_weights_path``. RuntimeError explaining what to provide when torch-fidelity or the
    file is missing (nothing is downloaded).
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as error:
        raise RuntimeError("FID with Inception-v3 needs torch-fidelity: pip install torch-fidelity "
                           "(or pass your own feature extractor with --fid-extractor module:factory, or to "
                           "dpar.pipeline.evaluate.fid)") from error
    path = inception_weights_path(weights_path)
    network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    network.eval()

    def extract(images: torch.Tensor) -> torch.Tensor:
        as_bytes = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return network(as_bytes)[0]

    return extract


def load_extractor(spec: str, device: str | torch.device = "cpu"):
    """The feature extractor named ``spec`` = "module:factory": ``factory(device)`` returns a callable mapping
    images float [B, 3, H, W] in [0, 1] (on ``device``) -> features [B, F]; the module must be importable."""
    import importlib

    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        raise ValueError(f"--fid-extractor {spec!r} must be 'module:factory' (factory(device) -> extractor)")
    factory = getattr(importlib.import_module(module_name), factory_name, None)
    if not callable(factory):
        raise ValueError(f"--fid-extractor {spec!r}: module {module_name} has no callable {factory_name}")
    network = factory(torch.device(device))
    return lambda images: network(images.to(device)).cpu()


def _image_files(folder: str) -> list[str]:
    from .extract_codes import IMAGE_EXTENSIONS

    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if len(files) < 2:
        raise ValueError(f"FID needs at least two images in {folder!r}, found {len(files)}")
    return files


@torch.no_grad()
def folder_statistics(folder: str, extractor, size: int, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of the features of every image in ``folder``, centre-cropped to ``size``, read in batches
    (a 50K-image folder never sits in memory as pixels)."""
    import numpy as np
    from PIL import Image

    from .extract_codes import center_crop

    files, features = _image_files(folder), []
    for start in range(0, len(files), batch_size):
        crops = []
        for path in files[start:start + batch_size]:
            with Image.open(path) as image:
                crops.append(center_crop(image.convert("RGB"), size))
        images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
        features.append(extractor(images).reshape(len(crops), -1).double())
    return feature_statistics(torch.cat(features))


def _reference_statistics(reference: str, extractor, size: int, batch_size: int):
    if os.path.isdir(reference):
        return folder_statistics(reference, extractor, size, batch_size)
    if not reference.endswith(".npz") or not os.path.isfile(reference):
        raise ValueError(f"--fid-ref {reference!r} must be an image folder or a statistics .npz (mu, sigma)")
    import numpy as np

    with np.load(reference) as stats:
        if "mu" not in stats or "sigma" not in stats:
            raise ValueError(f"--fid-ref {reference!r} holds {sorted(stats.files)}, needs 'mu' and 'sigma'")
        return torch.from_numpy(stats["mu"]), torch.from_numpy(stats["sigma"])


def _import_torch_fidelity():
    try:
        import torch_fidelity
    except ImportError:
        return None
    return torch_fidelity


def fid_against_reference(generated: str, reference: str, extractor_spec: str | None = None,
                          inception_weights: str | None = None, device: str = "cpu", batch_size: int = 64) -> float:
    """FID of the image folder ``generated`` against ``reference`` (image folder or .npz with mu / sigma).

    A reference folder goes to torch-fidelity's calculate_metrics as it is (its images must share one size, e.g.
    256 x 256 centre crops); with the project's own Frechet distance its images are centre-cropped to the samples'
    size. With ``extractor_spec`` ("module:factory", see load_extractor) the features are its own; else Inception-v3 of
    torch-fidelity; RuntimeError saying what to install or pass when it is missing.
    """
    from PIL import Image

    with Image.open(_image_files(generated)[0]) as first:
        size = first.size[0]
    torch_fidelity = None if extractor_spec or not os.path.isdir(reference) else _import_torch_fidelity()
    if torch_fidelity is not None:
        return float(torch_fidelity.calculate_metrics(
            input1=generated, input2=reference, fid=True, verbose=False, cuda=str(device).startswith("cuda"),
            feature_extractor_weights_path=inception_weights_path(inception_weights),
            batch_size=batch_size)["frechet_inception_distance"])
    extractor = load_extractor(extractor_spec, device) if extractor_spec else inception_extractor(inception_weights)
    return frechet_distance(*folder_statistics(generated, extractor, size, batch_size),
                            *_reference_statistics(reference, extractor, size, batch_size))


def write_fid_samples(args: argparse.Namespace) -> str:
    """``args.fid`` class-balanced samples of ``args.ckpt`` decoded by the VQ at ``args.vq_ckpt``, written as
    ``args.fid_out/<i>.png``; batches whose PNGs all exist are skipped (batch b samples with seed + b, so a resumed
    run writes the same images). Returns the folder."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from .builders import load_model
    from .sample import image_decoder, sample_tokens

    if not args.ckpt or not args.vq_ckpt or not args.fid_out:
        raise ValueError("--fid N needs --ckpt (the generator), --vq-ckpt (the decoder) and --fid-out")
    model, info = load_model(args.ckpt, args.kind, args.device)
    config = info["config"]
    entropy_model = None
    if args.kind == "dpar":
        if not args.entropy_ckpt or args.threshold is None:
            raise ValueError("sampling dpar for FID needs --entropy-ckpt and --threshold")
        entropy_model = load_model(args.entropy_ckpt, "entropy", args.device)[0]
    decode = image_decoder(None, args.vq_ckpt, config["vocab_size"], None, args.device)
    os.makedirs(args.fid_out, exist_ok=True)
    starts = range(0, args.fid, args.batch_size)
    for batch, start in enumerate(tqdm(starts, desc="FID samples", disable=len(starts) < 2)):
        indices = range(start, min(start + args.batch_size, args.fid))
        paths = [os.path.join(args.fid_out, f"{i:06d}.png") for i in indices]
        if all(os.path.exists(path) for path in paths):
            continue
        labels = torch.tensor(list(indices), device=args.device) % config["num_classes"]
        tokens, _, _ = sample_tokens(model, labels, entropy_model=entropy_model, threshold=args.threshold,
                                     max_patch_size=args.max_patch_size, cfg_scale=args.cfg_scale,
                                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     seed=args.seed + batch)
        images = decode(tokens.reshape(-1, config["grid_height"], config["grid_width"]))
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for path, image in zip(paths, pixels):
            Image.fromarray(np.ascontiguousarray(image)).save(path)
    return args.fid_out


def evaluate(args: argparse.Namespace) -> dict:
    """The metrics ``args`` ask for, as a flat dict (see add_arguments)."""
    from .builders import load_model
    from .data import TokenGridDataset
    from .objectives import LossModule, PatchSource, heldout_loss

    if not (args.patches or args.ckpt or (args.log and args.target_loss is not None)
            or (args.fid_real and args.fid_fake)):
        raise ValueError("nothing to evaluate: give --patches, --ckpt with --data, --log with --target-loss, "
                         "or --fid-real with --fid-fake")
    results = {}
    if args.patches:
        from .patchify import PatchTable
        table = PatchTable.load(args.patches)
        results.update(patch_statistics(table.patch_lengths, table.cu_patches, table.entropies.shape[1]))
    if args.ckpt and (args.data or args.fid is None):
        if not args.data:
            raise ValueError("held-out NLL needs --data")
        dataset = TokenGridDataset(args.data)
        model, info = load_model(args.ckpt, args.kind, args.device)
        source = None
        if args.kind == "dpar":
            if not args.entropy_ckpt or args.threshold is None:
                raise ValueError("evaluating dpar needs --entropy-ckpt and --threshold")
            entropy_model, _ = load_model(args.entropy_ckpt, "entropy", args.device)
            source = PatchSource(entropy_model=entropy_model, threshold=args.threshold,
                                 max_patch_size=args.max_patch_size, grid_width=dataset.grid_width)
        loss_module = LossModule(model, dataset.grid_width)
        results["heldout_nll"] = heldout_loss(loss_module, dataset, source, args.batch_size, args.device)
    if args.log and args.target_loss is not None:
        results["flops_to_target"] = flops_to_target(read_log(args.log), args.target_loss, args.target_key,
                                                     args.smoothing)
    if args.fid_real and args.fid_fake:
        extractor = inception_extractor(args.inception_weights)
        results["fid"] = fid(_load_images(args.fid_real), _load_images(args.fid_fake), extractor)
    if args.fid is not None:
        if args.fid < 2:
            raise ValueError(f"--fid needs N >= 2 samples, got {args.fid}")
        if not args.fid_ref:
            raise ValueError("--fid N needs --fid-ref (an image folder or a statistics .npz)")
        generated = write_fid_samples(args)
        results["fid"] = fid_against_reference(generated, args.fid_ref, args.fid_extractor, args.inception_weights,
                                               args.device, args.batch_size)
        results["fid_samples"] = args.fid
    return results


def _load_images(path: str) -> torch.Tensor:
    """A .pt file holding images float [N, 3, H, W] in [0, 1] (as `dpar sample --save-tensor` writes)."""
    images = torch.load(path, weights_only=True)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{path} must hold an image tensor [N, 3, H, W]")
    return images.float()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=("entropy", "dpar", "baseline"), default="dpar")
    parser.add_argument("--ckpt", help="model checkpoint: held-out NLL per token on --data")
    parser.add_argument("--data", help="held-out token dataset root")
    parser.add_argument("--entropy-ckpt", help="dpar: entropy model checkpoint for patches")
    parser.add_argument("--threshold", type=float, help="dpar: entropy threshold")
    parser.add_argument("--max-patch-size", type=int, default=4)
    parser.add_argument("--patches", help="patches file: tokens per image and reduction")
    parser.add_argument("--log", help="training log.jsonl: FLOPs to reach --target-loss")
    parser.add_argument("--target-loss", type=float)
    parser.add_argument("--target-key", default="loss", help="log field compared with the target (loss, val_loss)")
    parser.add_argument("--smoothing", type=int, default=1, help="average the last N values before comparing")
    parser.add_argument("--fid-real", help=".pt image tensor [N, 3, H, W] in [0, 1] (reference set)")
    parser.add_argument("--fid-fake", help=".pt image tensor [N, 3, H, W] in [0, 1] (generated set)")
    parser.add_argument("--inception-weights", help=f"local path of {INCEPTION_WEIGHTS} (torch-fidelity)")
    parser.add_argument("--fid", type=int, metavar="N", help="FID of N samples of --ckpt decoded by --vq-ckpt")
    parser.add_argument("--vq-ckpt", help="LlamaGen VQ checkpoint (vq_ds16_c2i.pt) decoding the --fid samples")
    parser.add_argument("--fid-ref", help="reference image folder or statistics .npz (mu, sigma)")
    parser.add_argument("--fid-out", help="folder for the --fid sample PNGs (resumable)")
    parser.add_argument("--fid-extractor", metavar="MODULE:FACTORY",
                        help="your feature extractor instead of Inception-v3: FACTORY(device) -> images -> features")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="--fid sampling: classifier-free guidance")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results to this JSON file")


def main(args: argparse.Namespace) -> None:
    results = evaluate(args)
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
