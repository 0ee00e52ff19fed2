"""`finetune export --format gguf`: the GGUF read back by an independent reader (transformers' GGUF
loader, and llama.cpp when llama-cpp-python is installed) against the merged model it came from.

The test model is the tiny Llama with head_dim 32 and matrices whose rows split into 32-value
blocks (hidden 96, intermediate 256), so every matrix really is Q8_0/Q4_0 in the quantized files
and llama.cpp's kernels take it.

Measured here (2 layers, LoRA r8 + trained embeddings/head, 20 steps), relative error
||logits_gguf - logits_hf|| / ||logits_hf|| over the test prompts: f16 3.4e-5, q8_0 7.0e-4, q4_0
6e-3 to 1e-2. f16 is held to the issue's 1e-3; q8_0 to 3e-3, four times the measured figure
(8-bit blocks of 32 with one scale each: a weight moves by up to absmax/254 of its block).
Logits alone are a weak check of the attention layout in a model this small: exporting without the
q/k row permutation llama.cpp needs moved them by only 2e-3 to 3e-3 here. So every weight is
compared too, as the reader dequantizes it (a wrong layout puts whole rows in the wrong place).
"""

from __future__ import annotations

import json
import shutil

import pytest

from finetune.errors import ExportError

pytest.importorskip("gguf")
pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "The red kettle costs $12. The blue lamp costs $40.\n\nHow much is the red kettle?"}],
    [{"role": "system", "content": "Answer with the price only."},
     {"role": "user", "content": "The oak desk costs $77. The teal mug costs $5.\n\nHow much is the teal mug?"}],
    [{"role": "user", "content": "The ivory vase costs $31.\n\nHow much is the ivory vase?"},
     {"role": "assistant", "content": "$31"}, {"role": "user", "content": "Thanks! And again?"}],
]


@pytest.fixture(scope="module")
def export_base(tmp_path_factory, chat_data):
    from finetune.tiny import build_tiny_model

    d = tmp_path_factory.mktemp("export-base") / "model"
    return build_tiny_model(d, [chat_data["train"]], vocab_size=320, hidden_size=96, layers=2, heads=3,
                            kv_heads=1, max_positions=512)


@pytest.fixture(scope="module")
def export_run(tmp_path_factory, export_base, chat_data):
    """A quickstart-like LoRA run: all linear layers plus trained embeddings and head."""
    from finetune.config import load_config
    from finetune.training.recipe import train

    out = tmp_path_factory.mktemp("export-run") / "run"
    return train(load_config(None, [
        f"model={export_base}", f"data.train={chat_data['train']}", f"output_dir={out}",
        "training.max_steps=20", "training.batch_size=8", "training.learning_rate=5e-3",
        "training.report_to=[none]", "max_length=128", "lora.r=8", "lora.alpha=16", "seed=0",
        "lora.modules_to_save=[embed_tokens,lm_head]",
    ]))


@pytest.fixture(scope="module")
def merged(export_run, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from finetune import merge_adapter

    d = merge_adapter(export_run / "adapter", tmp_path_factory.mktemp("merged") / "m", dtype="float32")
    return d, AutoModelForCausalLM.from_pretrained(d).eval()


@pytest.fixture(scope="module")
def exported(export_run, tmp_path_factory):
    """The run's adapter merged and exported at each quantization (one output directory each)."""
    from finetune.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(root / q, adapter=export_run / "adapter", quant=q, progress=False)
            for q in ("f16", "q8_0", "q4_0")}


def _prompt_ids(tok):
    from finetune.data.chat_template import render_prompt

    return [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS]


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float()


def _gguf_model(res):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(res.gguf.parent, gguf_file=res.gguf.name, dtype=torch.float32).eval()


def _rel_err(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


def _tensor_types(path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


@pytest.mark.parametrize("quant, tol", [("f16", 1e-3), ("q8_0", 3e-3)])
def test_gguf_logits_match_the_merged_model(exported, merged, export_run, quant, tol):
    from transformers import AutoTokenizer

    _, hf = merged
    tok = AutoTokenizer.from_pretrained(export_run / "adapter")
    model = _gguf_model(exported[quant])
    errs = []
    for ids in _prompt_ids(tok):
        want, got = _logits(hf, ids), _logits(model, ids)
        errs.append(_rel_err(got, want))
        if quant == "f16":  # the same next token everywhere, not only close logits
            assert (got.argmax(-1) == want.argmax(-1)).all()
    print(f"{quant}: relative logit error per prompt {[f'{e:.2e}' for e in errs]}")
    assert max(errs) < tol, errs
    # Weight by weight (measured: f16 at most 2.2e-4, q8_0 5.5e-3 relative; unpermuted q/k rows 1.4).
    want_w, got_w = hf.state_dict(), model.state_dict()
    assert set(got_w) == set(want_w)
    w_tol = {"f16": 1e-3, "q8_0": 2e-2}[quant]
    worst = max((_rel_err(got_w[k].float(), want_w[k].float()), k) for k in want_w)
    assert worst[0] < w_tol, worst
    types = _tensor_types(exported[quant].gguf)
    matrices = {n: t for n, t in types.items() if n.endswith(".weight") and "norm" not in n}
    assert set(matrices.values()) == {quant.upper()}, matrices  # every matrix really is in that type
    assert {t for n, t in types.items() if "norm" in n} == {"F32"}


def test_q4_0_is_quantized_and_still_close(exported, merged, export_run):
    """Q4_0 matrices, the output projection kept at Q8_0; a looser error than q8_0 (measured 6e-3 to 1e-2)."""
    from transformers import AutoTokenizer

    types = _tensor_types(exported["q4_0"].gguf)
    assert types["output.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q4_0"
    ids = _prompt_ids(AutoTokenizer.from_pretrained(export_run / "adapter"))[0]
    want = _logits(merged[1], ids)
    err4 = _rel_err(_logits(_gguf_model(exported["q4_0"]), ids), want)
    err8 = _rel_err(_logits(_gguf_model(exported["q8_0"]), ids), want)
    assert err8 < err4 < 5e-2, (err8, err4)


def test_gguf_tokenizer_and_chat_template_are_the_adapters(exported, export_run):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from finetune.data.chat_template import end_of_turn_token

    tok = AutoTokenizer.from_pretrained(export_run / "adapter")
    res = exported["f16"]
    back = AutoTokenizer.from_pretrained(res.gguf.parent, gguf_file=res.gguf.name)
    assert back.chat_template == tok.chat_template
    for p in PROMPTS:
        text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert back.apply_chat_template(p, tokenize=False, add_generation_prompt=True) == text
    r = GGUFReader(res.gguf)
    assert _field(r, "tokenizer.ggml.model") == "gpt2"  # byte-level BPE, as the tiny tokenizer is
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(r, "tokenizer.chat_template") == tok.chat_template
    eot = tok.convert_tokens_to_ids(end_of_turn_token(tok))
    assert _field(r, "tokenizer.ggml.eot_token_id") == eot == tok.eos_token_id
    assert _field(r, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert _field(r, "tokenizer.ggml.add_bos_token") is False  # the tiny tokenizer has no BOS
    assert "tokenizer.ggml.bos_token_id" not in r.fields
    assert len(_field(r, "tokenizer.ggml.tokens")) == len(tok)
    assert _field(r, "llama.attention.head_count") == 3 and _field(r, "llama.attention.head_count_kv") == 1
    assert _field(r, "llama.context_length") == 512
    assert _field(r, "llama.rope.freq_base") == pytest.approx(10000.0)


def test_modelfile_of_a_merged_export(exported):
    res = exported["q8_0"]
    text = res.modelfile.read_text()
    lines = text.splitlines()
    assert "FROM ./model-q8_0.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert "ADAPTER" not in text
    # The kit's ChatML is written as a TEMPLATE; the training data mixes examples with and without
    # a system prompt, so there is no SYSTEM line.
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert "SYSTEM" not in text
    assert f"ollama create NAME -f {res.modelfile}" in text


def test_modelfile_system_only_when_every_example_has_the_same_one(tmp_path, export_run):
    from transformers import AutoTokenizer

    from finetune.export.gguf import write_modelfile

    tok = AutoTokenizer.from_pretrained(export_run / "adapter")
    run = tmp_path / "run"
    run.mkdir()
    data = tmp_path / "train.jsonl"
    (run / "config.yaml").write_text(f"data:\n  train: {data}\n")

    def chat(system):
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        return json.dumps({"messages": ([{"role": "system", "content": system}] if system else []) + msgs})

    data.write_text("\n".join([chat("Answer with the price only.")] * 3) + "\n")
    text = write_modelfile(tmp_path / "out1", "model-f16.gguf", tok, run_dir=run).read_text()
    assert 'SYSTEM """Answer with the price only."""' in text
    data.write_text("\n".join([chat("Answer with the price only."), chat("Be brief.")]) + "\n")
    assert "SYSTEM" not in write_modelfile(tmp_path / "out2", "model-f16.gguf", tok, run_dir=run).read_text()
    data.write_text("\n".join([chat("Answer with the price only."), chat(None)]) + "\n")
    assert "SYSTEM" not in write_modelfile(tmp_path / "out3", "model-f16.gguf", tok, run_dir=run).read_text()


# ----------------------------------------------------------------------------------------------
# the adapter alone (llama.cpp LoRA layout)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_adapter(export_base, tmp_path_factory):
    """A LoRA adapter on every linear layer and the embedding, with random non-zero B."""
    from finetune.tiny import build_random_adapter

    return build_random_adapter(export_base, tmp_path_factory.mktemp("peft") / "adapter", r=8, alpha=16,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj", "embed_tokens"])


def test_adapter_only_gguf_is_llama_cpp_lora_layout(peft_adapter, export_base, tmp_path):
    import numpy as np
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from finetune.export.gguf import export_gguf

    res = export_gguf(tmp_path / "out", adapter=peft_adapter, adapter_only=True, quant="f32", progress=False)
    assert res.gguf.name == "adapter-f32.gguf"
    r = GGUFReader(res.gguf)
    assert _field(r, "general.type") == "adapter" and _field(r, "adapter.type") == "lora"
    assert _field(r, "adapter.lora.alpha") == pytest.approx(16.0)
    assert _field(r, "general.architecture") == "llama"
    got = {t.name: t for t in r.tensors}
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    peft = load_file(peft_adapter / "adapter_model.safetensors")
    expected = set()
    for layer in range(2):
        for hf, gg in gguf_names.items():
            part = "self_attn" if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{hf}"
            a, b = peft[f"{prefix}.lora_A.weight"].numpy(), peft[f"{prefix}.lora_B.weight"].numpy()
            if hf in ("q_proj", "k_proj"):  # llama.cpp's rotary layout: rows of each head interleaved
                n = 3 if hf == "q_proj" else 1
                b = b.reshape(n, 2, b.shape[0] // n // 2, b.shape[1]).swapaxes(1, 2).reshape(b.shape)
            for suffix, want in ((".lora_a", a), (".lora_b", b)):
                name = f"blk.{layer}.{gg}.weight{suffix}"
                expected.add(name)
                t = got[name]
                assert tuple(int(x) for x in reversed(t.shape)) == want.shape, name  # GGUF lists dims inner first
                assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), name
    # the embedding: A transposed (llama.cpp gathers its rows by token id), B as it is
    a, b = (peft[f"base_model.model.model.embed_tokens.lora_embedding_{x}"].numpy() for x in "AB")
    for suffix, want in ((".lora_a", a.T), (".lora_b", b)):
        t = got[f"token_embd.weight{suffix}"]
        assert tuple(int(x) for x in reversed(t.shape)) == want.shape
        assert np.array_equal(np.asarray(t.data).reshape(want.shape), want)
        expected.add(t.name)
    assert set(got) == expected
    text = res.modelfile.read_text()
    assert f"FROM {export_base.resolve()}" in text and "ADAPTER ./adapter-f32.gguf" in text


def test_adapter_only_f16_and_the_lora_b_permutation_undo(peft_adapter, tmp_path):
    """f16: the same weights to float16 rounding; q/k lora_b differ from PEFT's rows until the
    llama.cpp permutation is undone (so the permutation is really applied)."""
    import numpy as np
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from finetune.export.gguf import export_gguf

    res = export_gguf(tmp_path / "o", adapter=peft_adapter, adapter_only=True, quant="f16", progress=False)
    t = {x.name: x for x in GGUFReader(res.gguf).tensors}["blk.0.attn_q.weight.lora_b"]
    want = load_file(peft_adapter / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].numpy()
    got = np.asarray(t.data).astype(np.float32).reshape(want.shape)
    assert not np.allclose(got, want, atol=1e-2)
    undone = got.reshape(3, got.shape[0] // 6, 2, -1).swapaxes(1, 2).reshape(got.shape)
    np.testing.assert_allclose(undone, want, rtol=1e-3, atol=1e-4)


def test_adapter_only_with_trained_embeddings_is_a_clear_error(export_run, tmp_path):
    from finetune.export.gguf import export_gguf

    with pytest.raises(ExportError, match="modules_to_save.*drop --adapter-only"):
        export_gguf(tmp_path, adapter=export_run / "adapter", adapter_only=True, progress=False)
    assert not list(tmp_path.glob("*.gguf"))


def test_rslora_alpha_keeps_the_scale():
    import math

    from finetune.export.gguf import _adapter_alpha

    assert _adapter_alpha({"lora_alpha": 16, "r": 8}, None) == 16
    # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r)
    assert _adapter_alpha({"lora_alpha": 16, "r": 8, "use_rslora": True}, None) / 8 == pytest.approx(16 / math.sqrt(8))
    with pytest.raises(ExportError, match="alpha_pattern"):
        _adapter_alpha({"lora_alpha": 16, "r": 8, "alpha_pattern": {"q_proj": 4}}, None)


# ----------------------------------------------------------------------------------------------
# errors and atomic output
# ----------------------------------------------------------------------------------------------
def test_unsupported_architecture_and_quantization_are_one_clear_error(export_base, tmp_path, capsys):
    from finetune.cli import main
    from finetune.export.gguf import export_gguf

    other = tmp_path / "gpt2"
    shutil.copytree(export_base, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="GPT2LMHeadModel cannot be exported to GGUF; supported: "
                                          "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        export_gguf(tmp_path / "o", model=other, progress=False)
    with pytest.raises(ExportError, match="--quant q5_k is not supported for a model; supported: f32, f16, bf16, "
                                          "q8_0, q4_0"):
        export_gguf(tmp_path / "o", model=export_base, quant="q5_k")
    # through the CLI: exit code 2 and the message, no traceback
    assert main(["export", "--model", str(other), "--output", str(tmp_path / "o")]) == 2
    assert "supported: LlamaForCausalLM" in capsys.readouterr().err
    assert main(["export", "--adapter", str(export_base), "--adapter-only", "--quant", "q4_0",
                 "--output", str(tmp_path / "o")]) == 2
    assert "not supported for an adapter; supported: f32, f16, bf16, q8_0" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*.gguf"))


def test_cli_export_of_a_model_directory(export_base, tmp_path, capsys):
    from finetune.cli import main

    assert main(["export", "--model", str(export_base), "--quant", "q8_0", "--output", str(tmp_path)]) == 0
    assert (tmp_path / "model-q8_0.gguf").is_file() and (tmp_path / "Modelfile").is_file()
    assert "ollama create NAME -f" in capsys.readouterr().out


def test_a_failure_mid_write_leaves_no_partial_file(export_base, tmp_path, monkeypatch):
    import finetune.export.gguf as export

    out = tmp_path / "out"
    out.mkdir()
    (out / "model-f16.gguf").write_bytes(b"the previous export")
    real, calls = export._convert_tensor, []

    def failing(t):
        calls.append(t.name)
        if len(calls) == 5:
            raise OSError("No space left on device")
        return real(t)

    monkeypatch.setattr(export, "_convert_tensor", failing)
    with pytest.raises(OSError, match="No space left"):
        export.export_gguf(out, model=export_base, quant="f16", progress=False)
    assert len(calls) == 5  # it failed with four tensors already written to the temp file
    assert sorted(p.name for p in out.iterdir()) == ["model-f16.gguf"]  # no temp file, no Modelfile
    assert (out / "model-f16.gguf").read_bytes() == b"the previous export"


# ----------------------------------------------------------------------------------------------
# llama.cpp (optional: pip install llama-cpp-python)
# ----------------------------------------------------------------------------------------------
@pytest.mark.llama_cpp
def test_llama_cpp_greedy_replies_match_the_merged_model(exported, merged, export_run, export_base,
                                                         peft_adapter, tmp_path):
    """llama.cpp tokenizes the prompts to the same ids and answers them greedily with the merged
    model's reply (f16); and the adapter-only GGUF applied to the base GGUF equals the merged adapter."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from finetune import generate_replies, merge_adapter
    from finetune.export.gguf import export_gguf

    def llama(path, **kw):
        return llama_cpp.Llama(str(path), n_ctx=512, n_threads=1, verbose=False, seed=0, **kw)

    def greedy(llm, ids, eot, n=12):
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if tok == eot or len(out) == n:
                break
            out.append(tok)
        return out

    def check(llm, hf_dir, tok, n_prompts=len(PROMPTS)):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        replies = generate_replies(hf, tok, PROMPTS[:n_prompts], max_new_tokens=12)
        eot = tok.convert_tokens_to_ids("<|im_end|>")
        for p, ids, reply in zip(PROMPTS, _prompt_ids(tok), replies):
            text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
            got = tok.decode(greedy(llm, ids, eot), skip_special_tokens=True).strip()
            assert got == reply, (p, got, reply)
            print(f"llama.cpp reply {got!r} == merged {reply!r}")

    tok = AutoTokenizer.from_pretrained(export_run / "adapter")
    check(llama(exported["f16"].gguf), merged[0], tok)
    base = export_gguf(tmp_path / "base", model=export_base, quant="f16", progress=False)
    lora = export_gguf(tmp_path / "lora", adapter=peft_adapter, adapter_only=True, quant="f16", progress=False)
    merged_peft = merge_adapter(peft_adapter, tmp_path / "merged-peft", dtype="float32")
    check(llama(base.gguf, lora_path=str(lora.gguf)), merged_peft, tok)


# ----------------------------------------------------------------------------------------------
# a SentencePiece-style vocabulary (Llama 2, Mistral): BPE with byte fallback and "▁" for spaces
# ----------------------------------------------------------------------------------------------
SPM_TEXTS = ["Hello world", "The red kettle costs $12.\n\nHow much is the red kettle?", "café ünïcödé 你好 ☃",
             "[INST] hi [/INST]", "  two leading spaces"]


@pytest.fixture(scope="module")
def spm_export(tmp_path_factory):
    """A Llama-2-layout tokenizer.json (Prepend/Replace normalizer, byte fallback, <s> added in
    front) trained locally, a 1-layer model of its vocabulary, and its f16 GGUF."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from finetune.export.gguf import export_gguf
    from tests.conftest import make_chat_examples

    texts = [m["content"] for ex in make_chat_examples(200) for m in ex["messages"]] + SPM_TEXTS
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                          "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    d = tmp_path_factory.mktemp("spm")
    fast.save_pretrained(d / "model")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
                     ).save_pretrained(d / "model")
    return d / "model", export_gguf(d / "out", model=d / "model", quant="f16", progress=False)


def test_sentencepiece_style_vocabulary(spm_export):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    model_dir, res = spm_export
    tok = AutoTokenizer.from_pretrained(model_dir)
    r = GGUFReader(res.gguf)
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert _field(r, "tokenizer.ggml.add_bos_token") is True and _field(r, "tokenizer.ggml.bos_token_id") == 1
    assert _field(r, "tokenizer.ggml.add_space_prefix") is True
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[3] == types[258] == 6  # <0x00>..<0xFF>: BYTE
    assert types[0] == 2 and types[1] == types[2] == 3  # <unk> UNKNOWN, <s> </s> CONTROL
    back = AutoTokenizer.from_pretrained(res.gguf.parent, gguf_file=res.gguf.name)
    # transformers rebuilds a Metaspace tokenizer that treats leading spaces differently (it
    # documents this for SentencePiece GGUFs); llama.cpp, below, is checked on that text too.
    for text in SPM_TEXTS[:-1]:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text


@pytest.mark.llama_cpp
def test_llama_cpp_tokenizes_the_sentencepiece_vocabulary_like_the_model(spm_export):
    """llama.cpp's SentencePiece tokenizer merges by score: the scores derived from the merge ranks
    must reproduce the Hugging Face tokenizer, leading spaces, bytes and non-Latin text included."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    model_dir, res = spm_export
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = llama_cpp.Llama(str(res.gguf), vocab_only=True, verbose=False)
    for text in SPM_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text
    llm.close()


# ----------------------------------------------------------------------------------------------
# the other architectures, and the hyper-parameters of the real models the kit ships configs for
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_biases_and_mistral_export(arch, export_base, tmp_path):
    """Qwen2 (q/k/v biases, tied embeddings as its small models have, no q/k permutation) and
    Mistral (llama.cpp's llama architecture) read back with the logits of the Hugging Face model."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from finetune.export.gguf import export_gguf

    tok = AutoTokenizer.from_pretrained(export_base)
    kw = dict(vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=512,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **kw))
        with torch.no_grad():  # random init leaves biases at zero: give them something to carry
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.5)
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **kw))
    model.eval().save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    res = export_gguf(tmp_path / "out", model=tmp_path / "hf", quant="f16", progress=False)
    r = GGUFReader(res.gguf)
    names = {t.name: t.tensor_type.name for t in r.tensors}
    assert _field(r, "general.architecture") == ("qwen2" if arch == "qwen2" else "llama")
    if arch == "qwen2":
        assert names["blk.0.attn_q.bias"] == names["blk.1.attn_v.bias"] == "F32"
        assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    back = _gguf_model(res)
    ids = _prompt_ids(tok)[0]
    assert _rel_err(_logits(back, ids), _logits(model, ids)) < 1e-3


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-70b", "mistral-7b-v0.3", "qwen2.5-7b", "qwen2.5-72b"])
def test_hyperparameters_of_the_shipped_model_configs(name):
    import gguf

    from finetune.export.gguf import _add_hparams, _llama3_rope_factors
    from tests.conftest import REPO

    cfg = json.loads((REPO / "finetune" / "model_configs" / f"{name}.json").read_text())
    arch = "qwen2" if name.startswith("qwen") else "llama"
    w = gguf.GGUFWriter(None, arch)
    _add_hparams(w, cfg, cfg["vocab_size"])
    kv = {k: v.value for k, v in w.kv_data[0].items()}
    assert kv[f"{arch}.context_length"] == cfg["max_position_embeddings"]
    assert kv[f"{arch}.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert kv[f"{arch}.rope.freq_base"] == cfg["rope_theta"]
    assert kv[f"{arch}.attention.layer_norm_rms_epsilon"] == cfg["rms_norm_eps"]
    assert kv[f"{arch}.rope.dimension_count"] == cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    assert (_llama3_rope_factors(cfg) is not None) == name.startswith("llama-3.1")


def test_llama3_rope_factors_equal_transformers_frequencies():
    """The rope_freqs tensor llama.cpp divides its base frequencies by, against transformers' own
    Llama 3.1 frequencies (an independent implementation of the same scaling)."""
    import numpy as np
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from finetune.export.gguf import _llama3_rope_factors
    from tests.conftest import REPO

    raw = json.loads((REPO / "finetune" / "model_configs" / "llama-3.1-8b.json").read_text())
    cfg = LlamaConfig(**raw)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    dim = raw["head_dim"]
    plain = 1.0 / (raw["rope_theta"] ** (np.arange(0, dim, 2) / dim))
    factors = _llama3_rope_factors(raw)
    assert factors.shape == (dim // 2,) and factors.min() == 1.0 and factors.max() == 8.0
    np.testing.assert_allclose(plain / factors, scaled.double().numpy(), rtol=1e-5)


PRE_TEXTS = ["The kettle costs $12345.", "I'm here, you're there\n\n  ok?", "ünïcödé 你好 2024-12-01"]


@pytest.fixture(scope="module", params=["gpt-2", "llama-bpe", "qwen2"])
def pre_tokenizer_export(request, export_base, tmp_path_factory):
    """The tiny model with its byte-level vocabulary split the GPT-2, Llama 3 or Qwen2 way."""
    from finetune.export.gguf import _LLAMA3_SPLIT, _QWEN2_SPLIT, export_gguf

    d = tmp_path_factory.mktemp(f"pre-{request.param}")
    shutil.copytree(export_base, d / "model")
    if request.param != "gpt-2":
        tj = json.loads((d / "model" / "tokenizer.json").read_text())
        pattern = _LLAMA3_SPLIT if request.param == "llama-bpe" else _QWEN2_SPLIT
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        (d / "model" / "tokenizer.json").write_text(json.dumps(tj))
    return request.param, d / "model", export_gguf(d / "out", model=d / "model", quant="f16", progress=False)


def test_byte_level_pre_tokenizers_are_named_for_llama_cpp(pre_tokenizer_export):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    name, model_dir, res = pre_tokenizer_export
    assert _field(GGUFReader(res.gguf), "tokenizer.ggml.pre") == name
    tok = AutoTokenizer.from_pretrained(model_dir)
    back = AutoTokenizer.from_pretrained(res.gguf.parent, gguf_file=res.gguf.name)
    for text in PRE_TEXTS:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text


@pytest.mark.llama_cpp
def test_llama_cpp_splits_byte_level_text_like_the_model(pre_tokenizer_export):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    _, model_dir, res = pre_tokenizer_export
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = llama_cpp.Llama(str(res.gguf), vocab_only=True, verbose=False)
    for text in PRE_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text)["input_ids"], text
    llm.close()


def test_an_unknown_pre_tokenizer_is_a_clear_error(export_base, tmp_path):
    from finetune.export.gguf import export_gguf

    shutil.copytree(export_base, tmp_path / "model")
    tj = json.loads((tmp_path / "model" / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\d+|\D+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (tmp_path / "model" / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ExportError, match="pre-tokenizer is not one llama.cpp is known to reproduce"):
        export_gguf(tmp_path / "out", model=tmp_path / "model", progress=False)
    assert not list((tmp_path / "out").glob("*.gguf"))
