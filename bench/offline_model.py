"""Models and tokenizers made here, offline, for the benchmarks and the GPU check.

- build_gemma_style_tokenizer(texts, vocab_size, pad_to_size): the tests' tokenizer (tests/conftest.py),
  copied so that bench/ needs no pytest: a byte-fallback BPE trained on `texts`, wrapped as a
  GemmaTokenizer (pad 0, eos 1, bos 2, BOS prepended, right padding). pad_to_size grows the
  vocabulary to a model's embedding count with filler tokens, one character each (code points from
  U+10000 on, which the training text never holds), so every id a random model generates decodes
  to one character that tokenizes back to that one id: answer tokens counted by re-tokenizing a
  decoded answer are the tokens generated.
- vaultgemma_config(shape): a transformers VaultGemmaConfig of the given shape (VAULTGEMMA_1B is
  google/vaultgemma-1b's; TINY a 2-layer toy), eager attention.
- save_random_model(directory, shape, tokenizer, dtype, device, seed): a randomly initialised
  VaultGemmaForCausalLM of that shape, built directly on `device`, cast to `dtype`, saved with the
  tokenizer as a `--model DIR` that every script of this project loads.
- bundled_cards(): the bundled flashcards (data/medical_flashcards.jsonl), read directly.

torch, tokenizers and transformers are imported inside the functions.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED_FILE = REPO / "data" / "medical_flashcards.jsonl"
FILLER_FIRST_CODE_POINT = 0x10000


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    sliding_window: int
    max_position_embeddings: int

    def as_dict(self) -> dict:
        return asdict(self)


VAULTGEMMA_1B = ModelShape(
    vocab_size=256000,
    hidden_size=1152,
    intermediate_size=6912,
    num_hidden_layers=26,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    sliding_window=512,
    max_position_embeddings=1024,
)
TINY = ModelShape(
    vocab_size=600,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window=64,
    max_position_embeddings=512,
)


def bundled_cards() -> list[dict]:
    return [
        json.loads(line) for line in BUNDLED_FILE.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def build_gemma_style_tokenizer(texts: list[str], vocab_size: int = 2000, pad_to_size: int | None = None):
    """A byte-fallback BPE trained here, wrapped as a GemmaTokenizer (pad 0, eos 1, bos 2, like Gemma)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bpe.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_pieces)
    )
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    vocab = bpe.get_vocab()
    if pad_to_size is not None and pad_to_size > len(vocab):
        first = len(vocab)
        vocab.update({chr(FILLER_FIRST_CODE_POINT + i): first + i for i in range(pad_to_size - first)})
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tokenizer.padding_side = "right"
    return tokenizer


def vaultgemma_config(shape: ModelShape):
    from transformers import VaultGemmaConfig

    layer_types = ["sliding_attention", "full_attention"] * (shape.num_hidden_layers // 2) + [
        "sliding_attention"
    ] * (shape.num_hidden_layers % 2)
    config = VaultGemmaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        query_pre_attn_scalar=shape.head_dim,
        sliding_window=shape.sliding_window,
        max_position_embeddings=shape.max_position_embeddings,
        layer_types=layer_types,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config._attn_implementation = "eager"
    return config


def save_random_model(directory, shape: ModelShape, tokenizer, dtype, device="cpu", seed: int = 0) -> str:
    """A random VaultGemma of `shape` in `dtype` plus `tokenizer`, saved in `directory`; returns it."""
    import torch
    from transformers import VaultGemmaForCausalLM

    if len(tokenizer) > shape.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model only {shape.vocab_size}")
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it will run: a 1B model inits in seconds on a GPU
        model = VaultGemmaForCausalLM(vaultgemma_config(shape))
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return str(directory)
