"""The ledger's life through the Python API, on a tiny random model built here.

    python examples/python_api.py [WORKDIR]

Builds a 4-layer Llama from a config (nothing is downloaded), writes a few
question/answer records, then: create a ledger, register retain statistics,
register ledger-wide stability limits, forget two requests (the second under
looser limits for that call), revert the first, export HEAD and verify.
"""

from __future__ import annotations

import json
import string
import sys
import tempfile
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from kvw_ledger import KVWConfig, Ledger, StabilityCheckError, StabilityLimits
from kvw_ledger.bodies import parse


def build_model(model_dir: Path) -> None:
    """A character-level tokenizer and a tiny random Llama, saved as a model directory."""
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def write(path: Path, people: range) -> Path:
    cities = ["Lyon", "Oslo", "Lima", "Pune", "Kyiv", "Cork"]
    path.write_text("".join(
        json.dumps({"question": f"Where does person {i} live?", "answer": cities[i % 6]}) + "\n" for i in people
    ))
    return path


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="kvw-example-"))
    build_model(work / "model")
    retain = write(work / "retain.jsonl", range(10, 40))
    alice, bob = write(work / "alice.jsonl", range(0, 4)), write(work / "bob.jsonl", range(4, 8))

    ledger = Ledger.create(work / "ledger", work / "model", progress=False)
    ledger.retain(retain, progress=False)
    ledger.probe(limits=StabilityLimits(max_attenuation=0.4), progress=False)  # the ledger's from now on
    config = KVWConfig(gamma=0.5, layers=(0, 3))  # layers are 0-based and inclusive
    ledger.forget(alice, request_id="alice", reason="erasure request 1", config=config, progress=False)
    try:
        strict = ledger.limits(max_attenuation=0.001)  # the ledger's limits, one replaced, this call only
        ledger.forget(bob, request_id="bob", config=config, limits=strict, progress=False)
    except StabilityCheckError as e:
        print("refused, nothing committed:", str(e)[:60], "...")
    ledger.forget(bob, request_id="bob", reason="erasure request 2", config=config, progress=False)
    ledger.revert("alice", reason="withdrawn")
    exported = ledger.export(work / "export", progress=False)  # the version written
    report = ledger.verify()

    for entry in ledger.entries():
        body = parse(entry)  # the entry's typed body: its id, active requests and raw JSON
        print(entry.version, entry.op, body.id or "", body.active)
    print("verify:", "ok" if report.ok else report.problems)
    print("exported version", exported, "to", work / "export")


if __name__ == "__main__":
    main()
