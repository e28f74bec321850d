"""utils/training.py: dtype precedence, the LR schedule, RNG checkpointing, answer_nll, LoRA defaults and weights.

No Hugging Face model is built: answer_nll runs on a tiny torch module with the causal-LM surface the loss uses.
"""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import FP32_EPS
from utils import training
from utils.loss import per_example_loss_from_logits
from utils.prompt import IGNORE_INDEX


# --- compute_dtype -----------------------------------------------------------------------------------------


@pytest.fixture
def device_default_float64(monkeypatch):
    """A device whose default compute dtype is float64, so it is told apart from every other source."""
    import utils.model_loading

    monkeypatch.setattr(utils.model_loading, "default_compute_dtype", lambda device: torch.float64)


@pytest.mark.parametrize(
    "dtype, expected", [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)]
)
def test_explicit_dtype_beats_mixed_precision_and_the_device_default(device_default_float64, dtype, expected):
    for mixed_precision in ("bf16", "fp16", "no"):
        assert training.compute_dtype(dtype, mixed_precision, "cpu") == expected


@pytest.mark.parametrize("mixed_precision, expected", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_beats_the_device_default_under_auto(
    device_default_float64, mixed_precision, expected
):
    assert training.compute_dtype("auto", mixed_precision, "cpu") == expected


@pytest.mark.parametrize("mixed_precision", ["no", "", None])
def test_auto_without_mixed_precision_is_the_device_default(device_default_float64, mixed_precision):
    assert training.compute_dtype("auto", mixed_precision, "cpu") == torch.float64


def test_auto_on_cpu_without_mixed_precision_is_float32():
    assert training.compute_dtype("auto", "no", torch.device("cpu")) == torch.float32


def test_every_dtype_choice_is_known():
    assert (
        set(training.DTYPES) == {"auto", "float32", "bfloat16", "float16"} and training.DTYPES["auto"] is None
    )


# --- make_schedule ------------------------------------------------------------------------------------------


def schedule_lrs(total_steps: int, warmup_ratio: float, peak: float = 0.1) -> list[float]:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=peak)
    schedule = training.make_schedule(optimizer, total_steps, warmup_ratio)
    lrs = []
    for _ in range(total_steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    peak, total, warmup = 0.1, 10, 2  # warmup_ratio 0.2 of 10 steps
    lrs = schedule_lrs(total, 0.2, peak)
    expected = [peak * step / warmup for step in range(warmup)]
    expected += [
        peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        for step in range(warmup, total + 1)
    ]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert (
        lrs[0] == 0.0 and lrs[warmup] == pytest.approx(peak) and lrs[total] == pytest.approx(0.0, abs=1e-12)
    )
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # non-increasing after the warmup


def test_schedule_without_warmup_starts_at_the_peak():
    lrs = schedule_lrs(4, 0.0, peak=0.2)
    assert (
        lrs[0] == pytest.approx(0.2)
        and lrs[2] == pytest.approx(0.1)
        and lrs[4] == pytest.approx(0.0, abs=1e-12)
    )


def test_schedule_warmup_steps_are_the_rounded_share_of_the_total():
    lrs = schedule_lrs(10, 0.26)  # round(2.6) = 3 warmup steps
    assert lrs[:4] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])


# --- rng_state / restore_rng_state --------------------------------------------------------------------------


def test_rng_state_round_trip_restores_torch_and_the_noise_generator():
    noise = torch.Generator().manual_seed(123)
    torch.manual_seed(7)
    torch.rand(5), torch.randn(3, generator=noise)  # advance both away from their seeds
    state = training.rng_state(noise)
    first = (torch.rand(5), torch.randn(3, generator=noise))
    torch.rand(11), torch.randn(13, generator=noise)  # move on
    training.restore_rng_state(state, noise)
    second = (torch.rand(5), torch.randn(3, generator=noise))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_rng_state_is_a_snapshot_not_a_view():
    noise = torch.Generator().manual_seed(1)
    state = training.rng_state(noise)
    saved = (state["torch"].clone(), state["noise_generator"].clone())
    torch.rand(100), torch.randn(100, generator=noise)
    assert torch.equal(state["torch"], saved[0]) and torch.equal(state["noise_generator"], saved[1])


def test_rng_state_restored_into_a_fresh_generator_continues_the_same_stream():
    noise = torch.Generator().manual_seed(5)
    torch.randn(4, generator=noise)
    state = training.rng_state(noise)
    expected = torch.randn(6, generator=noise)
    fresh = torch.Generator()  # e.g. after a restart
    training.restore_rng_state(state, fresh)
    assert torch.equal(torch.randn(6, generator=fresh), expected)


def test_rng_state_without_a_noise_generator_holds_only_torch_and_restores_torch():
    state = training.rng_state(None)
    assert "noise_generator" not in state and "torch" in state
    expected = torch.rand(4)
    training.restore_rng_state(state, None)
    assert torch.equal(torch.rand(4), expected)
    training.restore_rng_state(state, torch.Generator())  # a generator given but none saved: left as it is


# --- answer_nll -----------------------------------------------------------------------------------------------


class TinyBody(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.dropout = torch.nn.Dropout(0.5)  # active only in train mode: answer_nll must not see it
        self.mix = torch.nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        x = torch.cumsum(x, dim=1) / torch.arange(1, x.shape[1] + 1).view(
            1, -1, 1
        )  # causal: position t sees <= t
        return SimpleNamespace(last_hidden_state=self.mix(self.dropout(x)))


class TinyCausalLM(torch.nn.Module):
    """The surface utils.loss uses: .model(...).last_hidden_state, get_output_embeddings(), config."""

    def __init__(self, vocab: int = 17, hidden: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyBody(vocab, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight.requires_grad_(False)  # frozen like the base head: the chunked path
        self.config = SimpleNamespace(final_logit_softcapping=None)

    def get_output_embeddings(self):
        return self.lm_head

    def logits(self, input_ids):
        return self.lm_head(self.model(input_ids).last_hidden_state)


EXAMPLES = [
    {"input_ids": [2, 5, 6, 7, 8, 1], "labels": [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 8, 1]},
    {"input_ids": [2, 9, 10, 1], "labels": [IGNORE_INDEX, IGNORE_INDEX, 10, 1]},
    {"input_ids": [2, 3, 4, 11, 12, 13, 1], "labels": [IGNORE_INDEX, IGNORE_INDEX, 4, 11, 12, 13, 1]},
]


@pytest.mark.parametrize("training_mode", [True, False])
def test_answer_nll_leaves_the_models_train_or_eval_mode_as_it_was(training_mode):
    model = TinyCausalLM().train(training_mode)
    training.answer_nll(model, EXAMPLES, batch_size=2, pad_token_id=0)
    assert model.training is training_mode and model.model.dropout.training is training_mode


def test_answer_nll_runs_in_eval_mode_so_a_training_model_gives_the_eval_values():
    model = TinyCausalLM()
    in_eval = training.answer_nll(model.eval(), EXAMPLES, batch_size=2, pad_token_id=0)
    in_train = training.answer_nll(model.train(), EXAMPLES, batch_size=2, pad_token_id=0)
    assert in_train == in_eval
    ids = torch.tensor([EXAMPLES[0]["input_ids"]])
    with torch.no_grad():  # the check has teeth: in train mode the dropout does change the model's output
        assert not torch.equal(model.train().logits(ids), model.eval().logits(ids))


def test_answer_nll_is_each_examples_mean_answer_token_nll_whatever_the_batch_size():
    model = TinyCausalLM().eval()
    expected = []
    with torch.no_grad():
        for e in EXAMPLES:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            expected.append(per_example_loss_from_logits(model.logits(ids), labels).item())
    for batch_size in (1, 2, 3):
        got = training.answer_nll(model, EXAMPLES, batch_size=batch_size, pad_token_id=0)
        assert len(got) == len(EXAMPLES) and got == pytest.approx(expected, rel=1e-5), batch_size


def test_answer_nll_takes_no_gradient():
    model = TinyCausalLM()
    training.answer_nll(model, EXAMPLES, batch_size=3, pad_token_id=0)
    assert all(p.grad is None for p in model.parameters())


# --- LoraArguments ------------------------------------------------------------------------------------------


def test_lora_arguments_default_targets_are_lora_targets_every_projection():
    assert training.LoraArguments().lora_target_modules == training.LORA_TARGETS
    assert set(training.LORA_TARGETS) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_lora_arguments_default_targets_are_a_fresh_copy():
    arguments = training.LoraArguments()
    arguments.lora_target_modules.append("lm_head")
    assert (
        "lm_head" not in training.LORA_TARGETS
        and "lm_head" not in training.LoraArguments().lora_target_modules
    )


def test_lora_arguments_defaults_and_every_field_has_help():
    arguments = training.LoraArguments()
    assert (arguments.lora_r, arguments.lora_alpha, arguments.lora_dropout) == (8, 16, 0.05)
    assert all(f.metadata.get("help", "").strip() for f in dataclasses.fields(training.LoraArguments))


def test_lora_weights_are_exactly_the_tensors_peft_saves_as_the_adapter_and_parts_pick_a_or_b():
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(TinyCausalLM(), LoraConfig(r=2, target_modules=["mix"]))
    weights = dict(training.lora_weights(model))
    saved = get_peft_model_state_dict(model)  # what the adapter file holds: the names without ".default"
    assert sorted(name.replace(".default", "") for name in weights) == sorted(saved)
    assert all(torch.equal(weights[name], saved[name.replace(".default", "")]) for name in weights)
    a_only = training.lora_weights(model, ("lora_A",))
    assert a_only and all(".lora_A." in name for name, _ in a_only) and len(a_only) == len(weights) // 2


def test_make_optimizer_is_adamw_or_sgd_whose_momentum_is_heavy_ball_at_0_9_when_unset():
    assert isinstance(
        training.make_optimizer([torch.nn.Parameter(torch.ones(1))], "adamw", 1e-3, 0.0, None),
        torch.optim.AdamW,
    )
    weight = torch.nn.Parameter(torch.ones(3))
    sgd = training.make_optimizer([weight], "sgd", 0.1, 0.0, None)
    for _ in range(2):
        weight.grad = torch.full((3,), 2.0)
        sgd.step()
    # v1 = g, v2 = 0.9 g + g: w = 1 - 0.1 * 2 - 0.1 * 3.8; float32 rounding of four operations on O(1) values
    assert torch.allclose(weight.detach(), torch.full((3,), 0.42), rtol=0, atol=4 * FP32_EPS)
