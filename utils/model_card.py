"""The Hugging Face model card (README.md) of a release bundle: a function of public parameters only.

Its YAML metadata names the base model (when it is a hub model), `library_name: peft`, the Gemma
licence and tags including `differential-privacy`; its privacy section states the guarantee, the
neighbouring relation, the threat model and what epsilon does not cover, in the same words as the
README's privacy section (both come from utils/privacy_record.py).
"""

from utils.privacy_record import PrivacyRecord, format_delta, format_epsilon

# --model strings whose hub id is known (the embedded GGUF is Gemma 3 270M, a base model)
KNOWN_HUB_IDS = {
    "gemma3-270m": "google/gemma-3-270m",
    "kaggle:google/vaultgemma/transformers/1b": "google/vaultgemma-1b",
}


def hub_base_model(model: str) -> str | None:
    """The hub id of --model, or None for a local path or file (metadata then omits base_model)."""
    if model in KNOWN_HUB_IDS:
        return KNOWN_HUB_IDS[model]
    if (
        model.startswith("kaggle:")
        or model.startswith((".", "/", "~"))
        or model.endswith(".gguf")
        or model.count("/") != 1
    ):
        return None
    return model


def _yaml_list(items) -> str:
    return "".join(f"\n- {item}" for item in items)


def split_line(split: dict, record: PrivacyRecord) -> str:
    column = split.get("user_column")  # the spec says how it split: by user at either privacy unit
    what, moved = (
        (f"each user's split follows from a keyed hash of its `{column}` value", "user")
        if column
        else ("each row's split follows from a keyed hash of its own content", "row")
    )
    kept = "users" if column else "rows"
    return (
        f"{what} (seed {split.get('seed')}, validation\n  {split.get('validation_fraction')}, test "
        f"{split.get('test_fraction')}, training {kept} kept with probability\n  "
        f"{split.get('train_sample_fraction')}), so one {moved} added or removed never moves another."
    )


def model_card(record: PrivacyRecord, base_model: str, lora: dict, split: dict) -> str:
    hub_id = hub_base_model(base_model)
    tags = ["differential-privacy", "dp-sgd", "lora", "peft", "medical", "opacus", "text-generation"]
    metadata = (
        "---\n"
        + (f"base_model: {hub_id}\n" if hub_id else "")
        + f"library_name: peft\nlicense: gemma\npipeline_tag: text-generation\ntags:{_yaml_list(tags)}\n---\n"
    )
    if record.dp_enabled:
        guarantee = (
            f"({format_epsilon(record.epsilon)}, {format_delta(record.delta)})-differential privacy "
            f"(epsilon and delta rounded up)"
        )
        if record.user_column:
            sampled = (
                f"{record.sample_rate:.6g} over users (expected {record.expected_batch_size} of N = "
                f"{record.n_users} training users, `{record.user_column}`), at most "
                f"{record.max_examples_per_user} random rows of each sampled user per step; each user's "
                f"gradient (the mean over its chosen rows) clipped to C = {record.max_grad_norm} as one vector"
            )
        else:
            sampled = (
                f"{record.sample_rate:.6g} (expected batch {record.expected_batch_size} of N = {record.n_train} "
                f"training rows), per-example gradients clipped to C = {record.max_grad_norm}"
            )
        mechanism = (
            f"DP-SGD on the LoRA weights only (the base model is frozen): Poisson sampling with q = "
            f"{sampled}, Gaussian noise "
            f"with noise multiplier sigma = {record.noise_multiplier:.6g} added once per step, "
            f"{record.steps_taken} steps; {record.accountant} accountant."
        )
        threat = (
            "Sampling and noise came from the operating system's cryptographic randomness (`--secure_mode`)."
            if record.secure_mode
            else "Sampling and noise came from seeded PyTorch generators: the guarantee holds only against "
            "someone who does not know the seed. The seed is kept in the private run record, not here; "
            "train with `--secure_mode` for adapters you release."
        )
        replace_one = format_epsilon(record.epsilon_replace_one)
        extra = f"- Replace-one epsilon of the same mechanism (N treated as public): {replace_one}\n"
        if record.forks:
            extra += (
                f"- This run forked from a resumed checkpoint {record.forks} time(s); composed epsilon "
                f"{format_epsilon(record.epsilon_with_forks)}\n"
            )
        if record.selected_on_private_data:
            extra += (
                f"- WARNING: this checkpoint was selected on private data ({record.selection}); "
                "epsilon does not cover that choice\n"
            )
    else:
        guarantee, mechanism, threat, extra = (
            "NO differential-privacy guarantee (trained with --disable_dp)",
            "Non-private LoRA fine-tuning.",
            "Not applicable.",
            "",
        )
    not_covered = "".join(f"- {item}\n" for item in record.not_covered())
    targets = ", ".join(sorted(lora.get("target_modules") or []))
    return f"""{metadata}
# LoRA adapters for {base_model}, fine-tuned on medical flashcards with differential privacy

PEFT LoRA adapters (rank {lora.get("r")}, alpha {lora.get("lora_alpha")}, on {targets})
trained with the vaultgemma-dp-lora scripts on medical question-answer flashcards.

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "path/to/this/directory")
```

## Privacy

- Guarantee: {guarantee}.
- Privacy unit: {record.unit}.
- Neighbouring datasets: {record.neighbouring_relation}.
- Mechanism: {mechanism}
- Threat model: {threat}
- Split: {split_line(split, record)}
{extra}
Epsilon does not cover:
{not_covered}
Everything in this directory is a function of the released weights and of public parameters: no row,
row hash, dataset fingerprint, loss or count of the training data is stored here.

## Licence

Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms.
These adapters are a Model Derivative under those terms; see NOTICE.
"""
