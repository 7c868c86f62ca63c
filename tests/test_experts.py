import itertools
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from loralab.artifacts import (
    ADAPTER_FILE,
    SKIP_BASE_CHECK,
    AdapterVerificationError,
    load_expert,
    verify_adapter,
    write_adapter,
)
from loralab.base_model import load_base_model, weights_fingerprint
from loralab.data import DomainDataModule
from loralab.io_utils import file_sha256
from loralab.training.common import build_trainer, configure_adamw_cosine, resolve_ckpt_path
from loralab.training.expert_module import LoRAExpertModule


def test_smoke_training_writes_three_verified_adapters(smoke_experts):
    root = Path(smoke_experts["dir"]) / "adapters"
    assert sorted(p.name for p in root.iterdir()) == ["code", "law", "medical"]
    for domain in ("law", "code", "medical"):
        d = root / domain
        assert {"adapter_config.json", ADAPTER_FILE, "manifest.json"} <= {
            p.name for p in d.iterdir()
        }
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["domain"] == domain
        assert manifest["adapter_sha256"] == file_sha256(d / ADAPTER_FILE)
        assert manifest["adapter_config_sha256"] == file_sha256(d / "adapter_config.json")
        assert manifest["base_model"]["fingerprint"] == smoke_experts["base_fingerprint"]
        assert manifest["lora"]["r"] == 4
        assert set(manifest["data"]["files"]) == {f"{domain}.jsonl"}
        assert manifest["training"]["global_step"] == 4
        assert {"torch", "peft", "transformers"} <= set(manifest["versions"])
        assert (
            json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"]
            == "loralab/tiny-llama"
        )
    table = json.loads((Path(smoke_experts["dir"]) / "expert_check.json").read_text())[
        "mean_token_nll"
    ]
    assert set(table) == {"base", "law", "code", "medical"}
    assert all(len(row) == 3 for row in table.values())
    assert (Path(smoke_experts["dir"]) / "expert_check.csv").read_text().count("\n") == 13


def test_rerun_reuses_verified_adapters(smoke_experts):
    from loralab.training.train_experts import train_experts

    before = {
        d: (Path(p) / ADAPTER_FILE).stat().st_mtime_ns for d, p in smoke_experts["adapters"].items()
    }
    cfg = smoke_experts["cfg"].copy()
    cfg.expert.check = False
    train_experts(cfg)
    after = {
        d: (Path(p) / ADAPTER_FILE).stat().st_mtime_ns for d, p in smoke_experts["adapters"].items()
    }
    assert before == after


def test_verify_refuses_tampered_files_other_base_and_old_manifests(
    smoke_experts, tmp_path, caplog
):
    import shutil

    fingerprint = smoke_experts["base_fingerprint"]
    src = Path(smoke_experts["adapters"]["law"])
    copy = tmp_path / "law"
    shutil.copytree(src, copy)
    assert verify_adapter(copy, fingerprint)["domain"] == "law"
    with pytest.raises(AdapterVerificationError, match="fingerprint"):
        verify_adapter(copy, "0" * 64)
    with pytest.raises(TypeError):
        verify_adapter(copy)  # type: ignore[call-arg]  # the fingerprint is not optional
    with caplog.at_level("WARNING", logger="loralab.artifacts"):
        verify_adapter(copy, SKIP_BASE_CHECK)  # explicit, and logged
    assert "fingerprint check skipped" in caplog.text

    config_path = copy / "adapter_config.json"
    original_config = config_path.read_text()
    config = json.loads(original_config)
    config["r"], config["lora_alpha"] = 8, 64  # a changed rank / alpha, weights untouched
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterVerificationError, match=r"adapter_config\.json: sha256"):
        verify_adapter(copy, fingerprint)
    config_path.write_text(original_config)
    verify_adapter(copy, fingerprint)

    data = bytearray((copy / ADAPTER_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy / ADAPTER_FILE).write_bytes(bytes(data))
    with pytest.raises(AdapterVerificationError, match=r"adapter_model\.safetensors: sha256"):
        verify_adapter(copy, fingerprint)

    old = json.loads((copy / "manifest.json").read_text())
    del old["adapter_config_sha256"]  # a manifest written before config hashing
    (copy / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(
        AdapterVerificationError, match=r"'adapter_config_sha256' is missing.*retrain"
    ):
        verify_adapter(copy, fingerprint)
    (copy / "manifest.json").unlink()
    with pytest.raises(AdapterVerificationError, match="manifest missing"):
        verify_adapter(copy, fingerprint)


def _tiny_module(compose_cfg):
    cfg = compose_cfg()
    base, tok = load_base_model(cfg.base_model)
    return cfg, LoRAExpertModule(base, cfg.expert.lora, cfg.expert.optim), tok


def test_reloaded_adapter_gives_same_logits(compose_cfg, tmp_path):
    cfg, module, tok = _tiny_module(compose_cfg)
    with torch.no_grad():  # non-zero B so the adapter changes the logits
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    module.model.eval()
    ids = torch.tensor([tok("Which clause governs termination?")["input_ids"]])
    expected = module.model(input_ids=ids).logits
    fingerprint = weights_fingerprint(module.model)
    write_adapter(
        module.model,
        tmp_path / "law",
        {"domain": "law", "base_model": {"name": "t", "fingerprint": fingerprint}},
    )
    base, _ = load_base_model(cfg.base_model)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "law")).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert not torch.allclose(base_logits, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    via_loader = load_expert(
        load_base_model(cfg.base_model)[0], {"law": tmp_path / "law"}, fingerprint
    )
    with torch.no_grad():
        torch.testing.assert_close(via_loader(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_resume_from_checkpoint_continues_at_the_same_step(compose_cfg, tmp_path):
    cfg = compose_cfg(["trainer.max_steps=2", "checkpoint_every_n_steps=1", "logger=none"])
    base, tok = load_base_model(cfg.base_model)
    dm = DomainDataModule(cfg.data, tok, ["law"])
    ckpt_dir = tmp_path / "ckpt"
    module = LoRAExpertModule(base, cfg.expert.lora, cfg.expert.optim)
    trainer = build_trainer(cfg, "law", ckpt_dir)
    trainer.fit(module, dm)
    assert trainer.global_step == 2
    lora_after_2 = {
        n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad
    }
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert all("lora_" in k for k in ckpt["state_dict"])  # only trainable weights are checkpointed

    cfg.trainer.max_steps = 4
    resumed = LoRAExpertModule(
        load_base_model(cfg.base_model)[0], cfg.expert.lora, cfg.expert.optim
    )
    trainer2 = build_trainer(cfg, "law", ckpt_dir)
    seen: dict = {}

    def first_batch(batch, idx):
        if not seen:
            seen["step"] = trainer2.global_step
            seen["weights"] = {
                n: p.detach().clone()
                for n, p in resumed.model.named_parameters()
                if p.requires_grad
            }

    resumed.on_train_batch_start = first_batch  # type: ignore[method-assign]
    trainer2.fit(resumed, dm, ckpt_path=resolve_ckpt_path("last", ckpt_dir))
    assert seen["step"] == 2 and trainer2.global_step == 4
    assert seen["weights"].keys() == lora_after_2.keys()
    for name, value in lora_after_2.items():
        torch.testing.assert_close(seen["weights"][name], value, rtol=0, atol=0)
    assert resolve_ckpt_path("last", tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), ckpt_dir)


def test_lr_schedule_warms_up_then_decays_to_the_min_ratio():
    param = torch.nn.Parameter(torch.zeros(1))
    optim = {"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1}
    scheduler = configure_adamw_cosine([param], optim, total_steps=100)["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(101):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5)  # linear warmup from 0
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # cosine half way between 1 and 0.1
    assert lrs[100] == pytest.approx(0.1)  # floor: min_lr_ratio * lr
    assert all(x >= y for x, y in itertools.pairwise(lrs[10:]))


def test_fingerprint_is_dtype_stable_and_weight_sensitive(compose_cfg):
    cfg = compose_cfg()
    base, _ = load_base_model(cfg.base_model)
    fp32 = weights_fingerprint(base)
    assert weights_fingerprint(base.to(torch.bfloat16)) == fp32
    with torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert weights_fingerprint(base) != fp32


@pytest.mark.gpu
def test_bf16_mixed_training_step_on_gpu(compose_cfg):
    cfg = compose_cfg(
        ["trainer=gpu", "trainer.max_steps=2", "logger=none", "base_model.device=cuda"]
    )
    base, tok = load_base_model(cfg.base_model, device="cpu")
    assert base.dtype == torch.bfloat16
    module = LoRAExpertModule(base, cfg.expert.lora, cfg.expert.optim)
    trainer = build_trainer(cfg, "law", Path(cfg.paths.output_dir) / "ckpt")
    trainer.fit(module, DomainDataModule(cfg.data, tok, ["law"]))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_training_learns_loss_falls_and_the_adapter_beats_the_untrained_one(compose_cfg, tmp_path):
    """A tiny task the random model cannot know (every answer is one fixed sentence): the training
    loss falls, and on held-out (test split) records the trained adapter's NLL beats the untrained."""
    import lightning as L

    from loralab.evaluation.nll import example_nll, mean_token_nll

    data = tmp_path / "data"
    data.mkdir()
    answer = "The clause is void because the contract was never signed."
    rows = [
        {"id": f"law-{i}", "domain": "law", "instruction": f"Question {i}: is clause {i} valid?",
         "response": answer}
        for i in range(400)
    ]  # fmt: skip
    (data / "law.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = compose_cfg(
        [f"data.root={data}", "data.max_train_per_domain=64", "trainer.max_steps=60",
         "trainer.val_check_interval=60", "logger=none", "expert.optim.warmup_steps=2",
         "expert.optim.lr=1e-2"]
    )  # fmt: skip
    losses: list[float] = []

    class RecordLoss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    base, tok = load_base_model(cfg.base_model)
    module = LoRAExpertModule(base, cfg.expert.lora, cfg.expert.optim)
    dm = DomainDataModule(cfg.data, tok, ["law"])
    test_batches = list(dm.eval_dataloader("test"))
    assert test_batches, "no held-out records"

    def held_out_nll() -> float:
        module.model.eval()
        with torch.no_grad():
            sums, counts = example_nll(
                lambda b: (
                    module.model(
                        input_ids=b["input_ids"], attention_mask=b["attention_mask"]
                    ).logits
                ),
                test_batches,
                "cpu",
            )
        return mean_token_nll(sums, counts)

    untrained = held_out_nll()  # a fresh LoRA (B = 0) is the base model
    trainer = build_trainer(cfg, "law", tmp_path / "ckpt", extra_callbacks=[RecordLoss()])
    trainer.fit(module, dm)
    trained = held_out_nll()
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # the training loss falls (nats)
    assert trained < untrained - 0.5  # the adapter beats the untrained one on held-out tokens
