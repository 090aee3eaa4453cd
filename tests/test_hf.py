"""HF safetensors export (nsa_flex/hf.py) and ``python -m nsa_flex.generate``, on a model trained
here: ``python -m nsa_flex.train --job.config_file configs/debug.toml`` for 4 steps, a full DCP
checkpoint at step 2 and an HF export (``--checkpoint.last_save_in_hf``) at step 4.

Round trips (DCP -> export -> load: the same state dict and logits, bit for bit), torchtitan's
own checkpointer saving and loading through the adapter, exports that must be refused with the
key or option named, and generate end to end (greedy is deterministic; the streamed text is
decode(ids)).
"""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from nsa_flex import generate  # noqa: E402
from nsa_flex.data.tokenizer import load_tokenizer  # noqa: E402
from nsa_flex.checkpoint import build_model, checkpoint_model_keys, model_args  # noqa: E402
from nsa_flex.hf import (HFExportError, NSAStateDictAdapter, check_export, config_dict,  # noqa: E402
                         hf_key, load_hf_state_dict, native_key)
from nsa_flex.hf import main as hf_main  # noqa: E402
from nsa_flex.model.args import replace  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = "def parse_args(argv):\n    "


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(dump folder, DCP step-2, HF step-4) of a 4-step debug run."""
    dump = tmp_path_factory.mktemp("debug")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run(
        [sys.executable, "-m", "nsa_flex.train", "--job.config_file", "configs/debug.toml",
         "--job.dump_folder", str(dump), "--training.steps", "4", "--checkpoint.interval", "2",
         "--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf",
         "--validation.no-enable"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    ckpt = dump / "checkpoint"
    return dump, ckpt / "step-2", ckpt / "step-4"


def debug_args(vocab=8192):
    return model_args("debug", vocab_size=vocab)


def dcp_model(path):
    layout = checkpoint_model_keys(path)
    return build_model(debug_args(), torch.device("cpu"), torch.float32, 0, path, layout)


def test_names_round_trip_and_are_llama_style():
    keys = build_model(replace(debug_args(64), n_layers=1), torch.device("cpu"),
                       torch.float32).state_dict().keys()
    hf = {k: hf_key(k) for k in keys}
    assert all(native_key(v) == k for k, v in hf.items())
    assert len(set(hf.values())) == len(hf)
    for k in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.layers.0.self_attn.gate_proj.bias", "model.layers.0.self_attn.k_cmp_proj.weight",
              "model.layers.0.self_attn.v_swa_proj.weight", "model.layers.0.self_attn.compress_k.pos_emb",
              "model.layers.0.self_attn.compress_v.fc2.weight"]:
        assert k in hf.values(), k
    with pytest.raises(HFExportError, match="unknown key 'model.layers.0.self_attn.q_norm.weight'"):
        native_key("model.layers.0.self_attn.q_norm.weight")


def test_the_trainer_writes_an_export_with_every_option(trained):
    _, _, hf = trained
    cfg = json.loads((hf / "config.json").read_text())
    args = replace(debug_args(), max_seq_len=256)    # update_from_config: the training seq_len
    assert cfg == config_dict(args, torch.float32, "embedded")
    assert cfg["nsa"] == {"cmp_block": 16, "cmp_stride": 8, "sel_block": 32, "sel_topn": 4,
                          "n_init": 1, "n_local": 2, "window": 64, "scale": None}
    assert set(cfg["rope_scaling_args"]) == {"scaling_factor", "low_freq_factor",
                                             "high_freq_factor", "original_max_position_embeddings"}
    assert check_export(hf, args).nsa == args.nsa
    export_args, sd = load_hf_state_dict(hf)
    assert export_args == args
    model = build_model(args, torch.device("cpu"), torch.float32)
    model.load_state_dict(sd)                        # strict: every weight, nothing else


def test_dcp_to_hf_round_trip_is_exact(trained, tmp_path):
    _, dcp, _ = trained
    assert hf_main(["export", "--checkpoint", str(dcp), "--config", "configs/debug.toml",
                    "--out", str(tmp_path / "hf")]) == 0
    a = dcp_model(dcp)
    export_args, sd = load_hf_state_dict(tmp_path / "hf", replace(debug_args(), max_seq_len=2048))
    assert sd.keys() == a.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in a.state_dict().items())
    b = build_model(export_args, torch.device("cpu"), torch.float32)
    b.load_state_dict(sd)
    tokens = torch.randint(0, 8192, (2, 96))
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


def test_torchtitans_checkpointer_saves_and_loads_through_the_adapter(tmp_path):
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.config import Checkpoint as CheckpointConfig

    args = replace(debug_args(512), max_seq_len=256)
    model = build_model(args, torch.device("cpu"), torch.float32, seed=1)

    def manager(m, **cfg):
        return CheckpointManager(
            dataloader=None, model_parts=[m], optimizers=None, lr_schedulers=None, states={},
            checkpoint_config=CheckpointConfig(enable=True, keep_latest_k=0, **cfg),
            sd_adapter=NSAStateDictAdapter(m.model_args, "embedded"), base_folder=str(tmp_path))

    manager(model, folder="a", last_save_model_only=True, last_save_in_hf=True).save(3, last_step=True)
    export = tmp_path / "a" / "step-3"
    assert json.loads((export / "config.json").read_text())["vocab_size"] == 512
    fresh = build_model(args, torch.device("cpu"), torch.float32, seed=2)
    assert manager(fresh, folder="b", initial_load_path=str(export), initial_load_in_hf=True,
                   initial_load_model_only=True).load()
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), fresh.state_dict().values()))
    other = build_model(replace(args, window=32), torch.device("cpu"), torch.float32)
    with pytest.raises(HFExportError, match="nsa.window: export 64, model 32"):
        manager(other, folder="c", initial_load_path=str(export), initial_load_in_hf=True,
                initial_load_model_only=True).load()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("sharded"))
    return dst


def _rewrite(export: Path, change) -> None:
    f = next(export.glob("*.safetensors"))
    sd = load_file(str(f))
    change(sd)
    save_file(sd, str(f))
    (export / "model.safetensors.index.json").unlink()


def test_bad_exports_are_refused_naming_the_key_or_option(trained, tmp_path):
    _, _, hf = trained
    args = replace(debug_args(), max_seq_len=256)
    k = "model.layers.1.self_attn.k_swa_proj.weight"

    missing = _copy(hf, tmp_path / "missing")
    _rewrite(missing, lambda sd: sd.pop(k))
    with pytest.raises(HFExportError, match=f"lacks 1 weight.*{k}"):
        load_hf_state_dict(missing)

    shape = _copy(hf, tmp_path / "shape")
    _rewrite(shape, lambda sd: sd.__setitem__(k, sd[k][:, :64].clone()))
    with pytest.raises(HFExportError, match=rf"{k} has shape \[64, 64\] .* but \[64, 128\]"):
        load_hf_state_dict(shape)

    def edit_config(name, edit):
        d = _copy(hf, tmp_path / name)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    window = edit_config("window", lambda c: c["nsa"].update(window=128))
    with pytest.raises(HFExportError, match="nsa.window: export 128, model 64"):
        check_export(window, args)
    block = edit_config("block", lambda c: c["nsa"].update(cmp_block=8, cmp_stride=4))
    with pytest.raises(HFExportError, match=r"compress_k.pos_emb has shape \[16, 32\] .* but \[8, 32\]"):
        load_hf_state_dict(block)
    unknown = edit_config("unknown", lambda c: c.update(sliding_window=64))
    with pytest.raises(HFExportError, match=r"unknown option\(s\) \['sliding_window'\]"):
        load_hf_state_dict(unknown)
    lost = edit_config("lost", lambda c: c.pop("kv_mode"))
    with pytest.raises(HFExportError, match=r"option\(s\) \['kv_mode'\] missing"):
        load_hf_state_dict(lost)
    nested = edit_config("nested", lambda c: c["nsa"].pop("n_local"))
    with pytest.raises(HFExportError, match=r"option\(s\) \['n_local'\] of nsa missing"):
        load_hf_state_dict(nested)
    shared = edit_config("shared", lambda c: c.update(kv_mode="shared"))
    with pytest.raises(HFExportError, match="holds 8 weight.*does not describe.*kv_mode='shared'"):
        load_hf_state_dict(shared)
    (none := _copy(hf, tmp_path / "none")).joinpath("config.json").unlink()
    with pytest.raises(HFExportError, match="has no config.json"):
        check_export(none)


def run_generate(*argv):
    out, err = io.StringIO(), io.StringIO()
    result = generate.run(list(argv), out=out, err=err)
    return result, out.getvalue(), err.getvalue()


def test_generate_greedy_from_dcp_and_hf(trained, tmp_path):
    dump, dcp, hf_last = trained
    common = ["--prompt", PROMPT, "--max-new-tokens", "24"]
    r1, text, err = run_generate("--checkpoint", str(dcp), "--config", "configs/debug.toml", *common)
    ids = r1["ids"][0]
    assert 0 < len(ids) <= 24
    tok = load_tokenizer("embedded")
    assert text == tok.decode(ids) + "\n" == r1["texts"][0] + "\n"   # streamed = decode(ids)
    assert "tokens/s" in err and "prefill" in err
    r2, text2, _ = run_generate("--checkpoint", str(dcp), *common)   # deterministic
    assert r2["ids"] == r1["ids"] and text2 == text
    # the same weights through an HF export: the same tokens
    assert hf_main(["export", "--checkpoint", str(dcp), "--out", str(tmp_path / "hf")]) == 0
    r3, text3, _ = run_generate("--checkpoint", str(tmp_path / "hf"), *common)
    assert r3["ids"] == r1["ids"] and text3 == text
    # the dump folder resolves to its newest step, the trainer's HF export
    r4, _, err4 = run_generate("--checkpoint", str(dump), *common)
    assert f"hf {hf_last}" in err4 and r4["ids"][0]
    # a ragged batch: each sequence continues as it does alone
    r5, text5, _ = run_generate("--checkpoint", str(dcp), "--prompt", "x = 1", *common)
    assert len(r5["ids"]) == 2 and r5["ids"][1] == ids
    assert r5["ids"][0] == run_generate("--checkpoint", str(dcp), "--prompt", "x = 1",
                                        "--max-new-tokens", "24")[0]["ids"][0]


def test_generate_sampling_is_seeded(trained):
    _, dcp, _ = trained
    common = ["--checkpoint", str(dcp), "--prompt", PROMPT, "--max-new-tokens", "16",
              "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95"]
    a = run_generate(*common, "--seed", "1")[0]["ids"]
    assert run_generate(*common, "--seed", "1")[0]["ids"] == a
    assert run_generate(*common, "--seed", "2")[0]["ids"] != a


def test_generate_refuses_what_exceeds_the_cache(trained, capsys):
    _, dcp, _ = trained
    code = generate.main(["--checkpoint", str(dcp), "--prompt", PROMPT, "--max-new-tokens", "60",
                          "--max-seq-len", "64"])
    msg = capsys.readouterr().err
    assert code == 2
    assert "+ --max-new-tokens 60 =" in msg and "exceed the cache capacity --max-seq-len 64" in msg
    assert "raise --max-seq-len to >=" in msg
    code = generate.main(["--checkpoint", str(dcp), "--prompt", PROMPT, "--flavor", "100m"])
    assert code == 2 and "has 2 layers but this model has 12" in capsys.readouterr().err


def test_generate_refuses_the_triton_decode_kernel_on_cpu(trained, capsys, monkeypatch):
    _, dcp, _ = trained
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = generate.main(["--checkpoint", str(dcp), "--prompt", PROMPT, "--device", "cpu",
                          "--decode-kernel", "triton"])
    msg = capsys.readouterr().err
    assert code == 2 and "--decode-kernel triton: decode kernel 'triton' needs a CUDA device" in msg
    assert "--decode-kernel torch" in msg
    r, _, _ = run_generate("--checkpoint", str(dcp), "--prompt", PROMPT, "--max-new-tokens", "8",
                           "--device", "cpu", "--decode-kernel", "torch")
    assert r["ids"][0] == run_generate("--checkpoint", str(dcp), "--prompt", PROMPT,
                                       "--max-new-tokens", "8", "--device", "cpu")[0]["ids"][0]


def test_device_and_dtype_resolve_auto_and_refuse_a_missing_gpu(monkeypatch):
    """The CLIs' shared --device/--dtype: auto picks cuda only when torch sees one (bfloat16
    there, float32 on cpu); --device cuda without a GPU stops with a message, before any work."""
    from nsa_flex.checkpoint import CheckpointError, device_and_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_and_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert device_and_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(CheckpointError, match="no CUDA device"):
        device_and_dtype("cuda", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_and_dtype("auto", "auto") == (torch.device("cuda"), torch.bfloat16)
    assert device_and_dtype("auto", "float32") == (torch.device("cuda"), torch.float32)
