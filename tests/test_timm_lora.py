"""timm backbones, their local weights, and LoRA: built with random weights (nothing is downloaded), checked against
timm's own models and against arithmetic done here."""

import json
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch

from ctplatform.config import TrainConfig
from ctplatform.model.backbones import WeightsUnavailableError, build_backbone
from ctplatform.model.classifier import build_classifier
from ctplatform.model.mil import build_mil_model

TINY_VIT = "test_vit"  # timm's 0.4M-parameter ViT (patch 16, width 64): the architecture of a real one, tiny


def randomise_adapters(model, seed=0):
    """LoRA's B starts at zero (the adapted model equals the base); give the adapters a real contribution."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


# --- backbones ---------------------------------------------------------------------------------------------------
def test_a_timm_vit_is_a_slice_encoder_and_a_mil_encoder():
    torch.manual_seed(0)
    clf = build_classifier(TINY_VIT).eval()
    x = torch.randn(3, 3, 48, 48)  # any multiple of the patch size: the position embedding follows the grid
    reference = timm.create_model(TINY_VIT, num_classes=0, dynamic_img_size=True).eval()
    reference.load_state_dict({k.removeprefix("backbone.model."): v for k, v in clf.state_dict().items()
                               if k.startswith("backbone.model.")})
    with torch.no_grad():
        torch.testing.assert_close(clf.embed(x), reference(x))  # the model's own pooled embedding (class token)
        assert clf(x).shape == (3, 18) and clf.embed_dim == 64
        mil = build_mil_model(TINY_VIT, mil_pooling="per-class").eval()
        assert mil(torch.randn(2, 4, 3, 32, 32)).shape == (2, 18)
    for refused in ({"use_attention": "cbam"}, {"use_attention": "se"}, {"use_multiscale": True}):
        with pytest.raises(ValueError, match="vision transformer"):
            build_classifier(TINY_VIT, **refused)


def test_a_timm_cnn_gives_three_stages_for_se_cbam_and_multiscale():
    clf = build_classifier("test_convnext", use_attention="cbam", use_multiscale=True).eval()
    feats = clf.backbone(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == clf.backbone.stage_channels
    assert [64 // f.shape[-1] for f in feats] == clf.backbone.out_strides == [8, 16, 32]
    assert clf(torch.randn(2, 3, 64, 64)).shape == (2, 18)


def test_model_names_are_the_guide_s_or_timm_s():
    assert TrainConfig(model="vit_small_patch14_dinov2").validate().model == "vit_small_patch14_dinov2"
    assert TrainConfig(model="vit_base_patch14_dinov2.lvd142m").validate()  # a pretrained tag is part of a name
    with pytest.raises(ValueError, match="resnet50, resnet101, efficientnet_b0 or any architecture timm knows"):
        TrainConfig(model="vit_b_16").validate()
    with pytest.raises(ValueError, match="never train"):
        TrainConfig(model=TINY_VIT, lora_rank=8, head="attention-mil", mil_frozen_encoder=True).validate()


# --- weights -----------------------------------------------------------------------------------------------------
def test_a_saved_timm_checkpoint_loads_through_weights_path_in_every_layout(tmp_path, capsys):
    from ctplatform.model.backbones import check_weights

    torch.manual_seed(1)
    source = timm.create_model(TINY_VIT, num_classes=1000)  # with its classifier, as timm saves one
    state = source.state_dict()
    hub = tmp_path / "models--timm--test_vit.r160_in1k"
    (hub / "snapshots" / "abc123").mkdir(parents=True)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123")
    safetensors.torch.save_file(state, hub / "snapshots" / "abc123" / "model.safetensors")
    safetensors.torch.save_file(state, tmp_path / "vit.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "vit.pth")  # DDP, wrapped
    extra = {**state, "extra.weight": torch.ones(2)}
    torch.save(extra, tmp_path / "extra.pth")
    for path in (tmp_path / "vit.safetensors", tmp_path / "vit.pth", hub, hub / "snapshots" / "abc123"):
        backbone = build_backbone(TINY_VIT, weights=str(path))
        for key, value in backbone.model.state_dict().items():
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    report = check_weights(TINY_VIT, str(tmp_path / "extra.pth"))
    # every backbone tensor loaded, the classifier (head.weight, head.bias) dropped, the stray key reported: one line
    assert f"{len(backbone.model.state_dict())} tensors loaded, 0 missing, 1 unexpected ['extra.weight']" in report
    assert report.endswith("classifier dropped (2 tensors)")
    assert capsys.readouterr().err.strip() == report
    partial = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    safetensors.torch.save_file(partial, tmp_path / "partial.safetensors")
    assert ", 12 missing ['blocks.1.attn.proj.bias'" in check_weights(TINY_VIT, str(tmp_path / "partial.safetensors"))

    resnet = tmp_path / "resnet.safetensors"
    safetensors.torch.save_file(timm.create_model("test_resnet").state_dict(), resnet)
    with pytest.raises(ValueError, match="holds no tensor"):
        build_backbone(TINY_VIT, weights=str(resnet))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone(TINY_VIT, weights=str(tmp_path / "nowhere.pth"))


def test_a_one_channel_checkpoint_is_adapted_to_the_three_windows(tmp_path):
    one = timm.create_model(TINY_VIT, in_chans=1, num_classes=0)
    safetensors.torch.save_file(one.state_dict(), tmp_path / "ct1.safetensors")
    backbone = build_backbone(TINY_VIT, weights=str(tmp_path / "ct1.safetensors"))
    loaded = backbone.model.patch_embed.proj.weight
    # timm's adaptation: the one-channel kernel repeated over 3 channels, scaled to keep the response to a gray input
    torch.testing.assert_close(loaded, one.patch_embed.proj.weight.repeat(1, 3, 1, 1) / 3)


def test_imagenet_weights_come_from_the_local_hub_cache_or_the_message_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match=r"hf download timm/test_vit\.r160_in1k"):
        build_backbone(TINY_VIT, weights="imagenet")
    state = timm.create_model(TINY_VIT, num_classes=0).state_dict()
    snapshot = tmp_path / "models--timm--test_vit.r160_in1k" / "snapshots" / "f00d"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--timm--test_vit.r160_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--test_vit.r160_in1k" / "refs" / "main").write_text("f00d")
    safetensors.torch.save_file(state, snapshot / "model.safetensors")
    backbone = build_backbone(TINY_VIT, weights="imagenet")
    torch.testing.assert_close(backbone.model.pos_embed, state["pos_embed"], rtol=0, atol=0)


# --- LoRA --------------------------------------------------------------------------------------------------------
def test_lora_on_vit_small_trains_the_adapters_only_about_one_percent():
    clf = build_classifier("vit_small_patch14_dinov2", lora_rank=8, lora_alpha=16)
    trainable = {n for n, p in clf.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r x (in + out) per adapted layer: the patch embedding (3*14*14 -> 384) and, in 12 blocks, qkv (384 -> 1152)
    # and the attention's output projection (384 -> 384)
    expected = 8 * (3 * 14 * 14 + 384) + 12 * 8 * ((384 + 1152) + (384 + 384))
    lora = sum(p.numel() for p in clf.backbone.parameters() if p.requires_grad)
    total = sum(p.numel() for p in clf.parameters())
    assert lora == expected and lora / total < 0.05
    # freezing acts on the adapters; the base weights never train
    clf.set_backbone_trainable(False)
    assert not any(p.requires_grad for p in clf.backbone.parameters())
    clf.set_backbone_trainable(True)
    assert {n for n, p in clf.backbone.named_parameters() if p.requires_grad} == trainable
    assert set(map(id, clf.backbone_parameters())) == {id(p) for p in clf.backbone.parameters() if p.requires_grad}


def test_lora_targets_regex_and_cnn_defaults():
    clf = build_classifier(TINY_VIT, lora_rank=2, lora_targets=r".*\.attn\.qkv")
    adapted = {n.split(".lora_")[0] for n, _ in clf.backbone.named_parameters() if ".lora_" in n}
    assert adapted == {f"model.blocks.{i}.attn.qkv" for i in range(len(clf.backbone.model.blocks))}
    with pytest.raises(ValueError, match="matches no linear or convolution"):
        build_classifier(TINY_VIT, lora_rank=2, lora_targets="nothing_here")
    cnn = build_classifier("test_convnext", lora_rank=2)
    adapted = {n.split(".lora_")[0] for n, _ in cnn.backbone.named_parameters() if ".lora_" in n}
    plain = build_classifier("test_convnext")
    convs = {n: m.groups for n, m in plain.backbone.named_modules() if isinstance(m, torch.nn.Conv2d)}
    # every ungrouped convolution; ConvNeXt's depthwise ones keep their weights
    assert adapted == {n for n, groups in convs.items() if groups == 1} and len(adapted) < len(convs)


@pytest.mark.parametrize("head", ["slice", "attention-mil"])
def test_lora_checkpoint_merges_exports_and_loads_with_the_same_outputs_and_without_peft(tmp_path, head):
    from ctplatform.data.preprocess import PreprocessSettings
    from ctplatform.model.bundle import export_bundle, load_bundle
    from ctplatform.model.bundle_check import check_bundle

    torch.manual_seed(3)
    cfg = TrainConfig(model=TINY_VIT, head=head, lora_rank=4, lora_alpha=8.0, input_windows="three")
    build = build_mil_model if head == "attention-mil" else build_classifier
    model = build(TINY_VIT, lora_rank=4, lora_alpha=8.0).eval()
    randomise_adapters(model)
    x = torch.randn(2, 3, 3, 32, 32) if head == "attention-mil" else torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    # a Lightning checkpoint as the training module saves it (model.* keys, the settings in hyper_parameters)
    checkpoint = tmp_path / "run.ckpt"
    preprocess = PreprocessSettings(image_size=32, num_slices=3).to_dict()
    torch.save({"epoch": 0, "hyper_parameters": {"config": cfg.to_dict(), "preprocess": preprocess},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    merged, spec = load_bundle(checkpoint)
    assert not any("lora" in k for k in merged.state_dict()) and "lora_rank" not in spec.architecture
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)
    bundle = export_bundle(tmp_path / "bundle", merged, spec)
    check_bundle(bundle)
    # served as the plain architecture: a fresh process loads the bundle and never imports peft
    code = ("import sys, json, torch; from ctplatform.model.bundle import load_bundle; "
            f"m, _ = load_bundle({str(bundle)!r}); x = torch.load({str(tmp_path / 'x.pt')!r}); "
            "print(json.dumps({'peft': 'peft' in sys.modules, 'out': m(x).tolist()}))")
    torch.save(x, tmp_path / "x.pt")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["peft"] is False
    torch.testing.assert_close(torch.tensor(answer["out"]), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="merge the LoRA adapters"):
        export_bundle(tmp_path / "unmerged", model, spec)


def test_a_sweep_may_search_the_lora_rank(tmp_path):
    from ctplatform.tune.space import load_space

    space_file = tmp_path / "space.yaml"
    space_file.write_text("metric: val/volume_auroc\nmode: max\nparams:\n"
                          "  lora_rank: {type: categorical, choices: [0, 4, 8]}\n")
    assert load_space(space_file).params["lora_rank"]["choices"] == [0, 4, 8]
    assert TrainConfig(model=TINY_VIT, lora_rank=4).validate().lora_rank == 4


@pytest.mark.benchmark
@pytest.mark.timeout(3600)
def test_lora_and_attention_pooling_beat_a_frozen_backbone_with_mean_pooling(tmp_path):
    """The paper's ablation offline (benchmarks/lora_ablation.py, BENCHMARKS.md): a small ViT pretrained on other
    volumes' slice labels; LoRA + attention pooling at least 0.05 macro AUROC above frozen + mean pooling, averaged
    over 3 seeds, and above it on each seed. About 4 minutes on a quiet 2-core CPU: `pytest -m benchmark`."""
    import importlib.util
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    spec = importlib.util.spec_from_file_location("lora_ablation", bench_dir / "lora_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--seeds", "0", "1", "2", "--workdir", str(tmp_path)])
    assert rows[-1]["difference"] >= 0.05, rows
    assert all(row["difference"] > 0 for row in rows[:-1]), rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vit_small_with_lora_takes_a_bf16_checkpointed_step_on_gpu():
    from ctplatform.model.losses import build_loss

    clf = build_classifier("vit_small_patch14_dinov2", lora_rank=8, lora_alpha=16, grad_checkpoint=True).cuda()
    clf = clf.to(memory_format=torch.channels_last).train()
    x = torch.randn(8, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = (torch.rand(8, 18, device="cuda") < 0.3).float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = build_loss("bce")(clf(x), y)
    loss.backward()
    grads = [p.grad for p in clf.parameters() if p.requires_grad]
    assert loss.dtype == torch.float32 and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for n, p in clf.backbone.named_parameters() if ".lora_" not in n)


@pytest.mark.slow
def test_progressive_unfreeze_with_lora_trains_the_adapters_from_the_epoch_and_never_the_base(tiny_cache, tmp_path):
    from ctplatform.train.datamodule import CTDataModule
    from ctplatform.train.lightning_import import pl
    from ctplatform.train.module import CTClassifierModule
    from ctplatform.train.trainer import build_trainer

    class Record(pl.Callback):
        def __init__(self):
            self.seen = {}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:
                held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
                self.seen[trainer.current_epoch] = held

    cfg = TrainConfig(slice_dir=str(tiny_cache), model=TINY_VIT, weights="none", lora_rank=4, batch_size=16, epochs=2,
                      num_workers=0, learning_rate=1e-2, seed=0, progressive_unfreeze=True, unfreeze_epoch=1,
                      limit_train_batches=2).validate()
    module = CTClassifierModule(cfg.to_dict())
    base = {n: p.detach().clone() for n, p in module.model.backbone.named_parameters() if ".lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in module.model.backbone.named_parameters() if ".lora_" in n}
    recorder = Record()
    trainer = build_trainer(cfg, tmp_path, extra_callbacks=[recorder], enable_progress_bar=False, accelerator="cpu")
    trainer.fit(module, datamodule=CTDataModule(cfg.slice_dir, cfg.batch_size, 0))
    lora_ids = {id(p) for p in module.model.backbone_parameters()}
    assert len(lora_ids) == len(adapters) > 0
    assert recorder.seen[0] == {id(p) for p in module.model.head_parameters()}  # the head alone first
    assert recorder.seen[1] == recorder.seen[0] | lora_ids  # then the adapters join; the base weights never do
    after = dict(module.model.backbone.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())
    assert any(not torch.equal(after[n], v) for n, v in adapters.items() if ".lora_B." in n)
