"""GPU checks of the product path (run with `pytest -m gpu` on a CUDA machine)."""

import json
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_ray_train_pinned_gpu_bf16(tiny_cache, tmp_path):
    from ctplatform.config import TrainConfig
    from ctplatform.ray_session import connect, shutdown_if
    from ctplatform.train.lightning_import import pl
    from ctplatform.train.ray_launcher import build_torch_trainer, resolved

    seen = tmp_path / "seen.json"

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == 0:
                seen.write_text(json.dumps({"visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                            "count": torch.cuda.device_count(),
                                            "device": str(module.device), "precision": str(trainer.precision)}))

    cfg = TrainConfig(slice_dir=str(tiny_cache), storage_path=str(tmp_path / "runs"), model="resnet50",
                      batch_size=16, epochs=1, num_workers=2, gpu_device=0, use_mixed_precision=True,
                      limit_train_batches=2)
    started = connect(gpu_device=cfg.gpu_device, quiet=True)  # --gpu-device: Ray only sees GPU 0
    try:
        result = build_torch_trainer(resolved(cfg), worker_callbacks=[Probe()], progress_bar=False).fit()
    finally:
        shutdown_if(started)
    info = json.loads(seen.read_text())
    assert info["count"] == 1 and info["device"].startswith("cuda") and "bf16" in info["precision"]
    assert result.error is None and result.metrics["epoch"] == 0


@needs_cuda
def test_predictor_on_cuda_matches_cpu(tmp_path):
    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.evaluation.predictor import Predictor
    from ctplatform.model.bundle import ModelSpec, export_bundle
    from ctplatform.model.classifier import build_classifier

    torch.manual_seed(0)
    model = build_classifier("resnet50", use_attention="cbam", use_multiscale=True).eval()
    export_bundle(tmp_path / "b", model, ModelSpec({"head": "slice", **model.architecture()}, "three",
                                                   PreprocessSettings(image_size=64, num_slices=8).to_dict()))
    slices = np.random.default_rng(0).integers(-1024, 1500, (8, 64, 64)).astype(np.int16)
    cpu = Predictor.from_path(tmp_path / "b", device="cpu").predict_prepared(slices)
    gpu = Predictor.from_path(tmp_path / "b", device="cuda").predict_prepared(slices)
    np.testing.assert_allclose(gpu.raw_probabilities, cpu.raw_probabilities, atol=2e-3)


@needs_cuda
def test_attention_mil_bf16_checkpointed_step_and_cuda_predictor_match_cpu(tmp_path):
    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.evaluation.predictor import Predictor
    from ctplatform.model.bundle import ModelSpec, export_bundle
    from ctplatform.model.mil import build_mil_model
    from ctplatform.model.windows import hu_to_input

    torch.manual_seed(0)
    model = build_mil_model("efficientnet_b0", use_attention="se", checkpointing=True, chunk_slices=4)
    model = model.cuda().to(memory_format=torch.channels_last).train()
    hu = torch.randint(-1024, 1500, (2, 6, 64, 64), dtype=torch.int16, device="cuda")
    x = hu_to_input(hu.flatten(0, 1), "three").unflatten(0, (2, 6))
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2], device="cuda")  # the second volume has 4 slices
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x, mask)
    torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), torch.ones_like(logits.float())).backward()
    stem = next(p for p in model.encoder.backbone.parameters())
    assert logits.shape == (2, 18) and stem.grad is not None and torch.isfinite(stem.grad).all()

    model = model.eval().cpu()
    export_bundle(tmp_path / "b", model, ModelSpec({"head": "attention-mil", **model.architecture()}, "three",
                                                    PreprocessSettings(image_size=64, num_slices=6).to_dict()))
    slices = hu[0].cpu().numpy()
    cpu = Predictor.from_path(tmp_path / "b", device="cpu").predict_prepared(slices)
    gpu = Predictor.from_path(tmp_path / "b", device="cuda").predict_prepared(slices)
    np.testing.assert_allclose(gpu.raw_probabilities, cpu.raw_probabilities, atol=2e-3)
    np.testing.assert_allclose(gpu.slice_weights, cpu.slice_weights, atol=2e-3)
    np.testing.assert_allclose(gpu.slice_weights.sum(axis=0), 1.0, atol=1e-4)


@needs_cuda
def test_lightning_training_steps_do_not_wait_for_the_gpu(tiny_cache, tmp_path):
    """No host-device synchronisation in the steady-state training step (bf16, progress bar on): the CPU queues
    step N+1 while the GPU still runs step N. Lightning reads prog_bar metrics back after every step; the logger and
    the bar may read once per LOG_EVERY_N_STEPS steps."""
    import warnings

    from ctplatform.config import TrainConfig
    from ctplatform.train.datamodule import CTDataModule
    from ctplatform.train.lightning_import import pl
    from ctplatform.train.module import CTClassifierModule
    from ctplatform.train.trainer import build_trainer

    cfg = TrainConfig(slice_dir=str(tiny_cache), model="efficientnet_b0", batch_size=4, epochs=1, num_workers=0,
                      use_gpu=True, use_mixed_precision=True).validate()
    at_step_start: list[int] = []  # how many warnings were recorded when each training step started
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        class Mark(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                at_step_start.append(len(caught))

        trainer = build_trainer(cfg, tmp_path, extra_callbacks=[Mark()], accelerator="gpu", devices=1)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit(CTClassifierModule(cfg.to_dict()), datamodule=CTDataModule(cfg.slice_dir, cfg.batch_size, 0))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # from step 1: step 0 creates state (optimizer, cuDNN benchmark) and may synchronise
    steps = len(at_step_start) - 2
    window = caught[at_step_start[1]:at_step_start[-1]]
    syncs = [w for w in window if "synchroniz" in str(w.message)]
    assert steps >= 20
    assert len(syncs) <= steps / 4, f"{len(syncs)} synchronising CUDA calls over {steps} steps: {syncs[:3]}"
