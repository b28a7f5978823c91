"""Write a tiny random Llama model as GGUF, offline, for the demo and the tests.

Weights are random, so the text is noise, but llama.cpp loads, tokenizes and generates with
it exactly as with a real model. The tokenizer is byte-level BPE (``gpt2``): the 128 ASCII
byte tokens, one merge (llama.cpp refuses a vocabulary without merges) and BOS/EOS.

Only ASCII bytes are in the vocabulary on purpose: a random model that can emit bytes >= 0x80
emits broken UTF-8 sequences, and llama-cpp-python keeps generating past ``max_tokens`` until
they decode, so a fixed output length would not hold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value, the form byte-level BPE vocabularies use."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    table = dict(zip(keep, codes))
    return [chr(table[b]) for b in range(256)]


def write_tiny_llama(
    path: Path,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    context_length: int = 4096,
    seed: int = 0,
    ascii_bytes: int = 128,
) -> Path:
    """Write the model to ``path`` and return it. About 0.5 MB with the defaults."""
    import gguf  # orchestrator dependency; imported here so config-only users don't pay for it

    rng = np.random.default_rng(seed)
    symbols = byte_symbols()[:ascii_bytes]
    space, t = symbols[ord(" ")], symbols[ord("t")]
    tokens = symbols + [space + t, "<s>", "</s>"]
    types = [gguf.TokenType.NORMAL] * (len(symbols) + 1) + [gguf.TokenType.CONTROL] * 2
    bos, eos = len(symbols) + 1, len(symbols) + 2
    n_vocab = len(tokens)

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{space} {t}"])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(True)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", rand(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(n_embd))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + name + ".weight", rand(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", ones(n_embd))
        w.add_tensor(p + "ffn_gate.weight", rand(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", rand(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", rand(n_embd, n_ff))
    w.add_tensor("output_norm.weight", ones(n_embd))
    w.add_tensor("output.weight", rand(n_vocab, n_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Llama GGUF model (no download).")
    parser.add_argument("path", type=Path, nargs="?", default=Path("models/tiny-llama.gguf"))
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_tiny_llama(args.path, context_length=args.context_length, seed=args.seed)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
