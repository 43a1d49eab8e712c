"""Ray Train: a training function in N Ray workers (one per GPU, or CPU workers), each a rank of one process group.

Used when the launcher started a Ray cluster inside the allocation and set DFLASH_LAUNCHER=ray (and
DFLASH_RAY_ADDRESS); the number of workers is DFLASH_RAY_WORKERS (default: all GPUs of the cluster, else 2 CPUs).
GPU workers are packed (one per GPU, a node's GPUs filled first); CPU workers, one per node in the layout, are
spread over the nodes. Where each worker ran (Ray node id, hostname) is in the provenance summary (`ray_placement`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

PLACEMENT = "ray/placement"         # under the work directory: one file per worker, written when it starts


def _worker(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(ctx.get_world_size()), LOCAL_RANK=str(ctx.get_local_rank()))
    placed = Path(config["work"]) / PLACEMENT
    placed.mkdir(parents=True, exist_ok=True)
    (placed / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}))
    upstream = {k: Path(v) for k, v in config["upstream"].items()}
    config["train"](config["cfg"], Path(config["out"]), upstream, Path(config["work"]), print, config["tracking"])


def fit(train, cfg: dict, out: Path, upstream: dict[str, Path], work: Path, tracking: dict) -> dict:
    """Run `train(cfg, out, upstream, work, log, tracking)` in every worker; the summary rank 0 wrote."""
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise ImportError("DFLASH_LAUNCHER=ray needs Ray Train: pip install -e '.[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("DFLASH_RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=True)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = int(os.environ.get("DFLASH_RAY_WORKERS", gpus or 2))
    shutil.rmtree(Path(work) / PLACEMENT, ignore_errors=True)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"train": train, "cfg": cfg, "out": str(Path(out).resolve()),
                           "work": str(Path(work).resolve()),
                           "upstream": {k: str(Path(v).resolve()) for k, v in upstream.items()},
                           "tracking": {**tracking, "progress": False}},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                     placement_strategy="PACK" if gpus else "SPREAD"),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        run_config=RunConfig(storage_path=str(Path(work).resolve() / "ray"), name="train"),
    )
    trainer.fit()
    summary = json.loads((Path(out) / "summary.json").read_text())
    placement = sorted((json.loads(f.read_text()) for f in (Path(work) / PLACEMENT).glob("rank-*.json")),
                       key=lambda p: p["rank"])
    return {"summary": {**summary, "launcher": "ray", "ray_workers": workers, "ray_placement": placement,
                        "ray_nodes": len({p["node_id"] for p in placement})}}
