"""Fine-tune a Gemma-family causal LM (VaultGemma by default) on medical flashcards with LoRA under
example-level (epsilon, delta) differential privacy.

Privacy contract (each clause lives in one named place)
- Unit and relation: one row of the dataset file passed to --dataset; neighbouring datasets differ
  by adding or removing one such row (utils/privacy_record.py). Exact duplicates are dropped first.
- Split: each row goes to train, validation or test by a keyed hash of its own content
  (utils/data.py SplitSpec), so one row added or removed changes the training set by at most that
  row; --train_sample_fraction keeps training rows by a second keyed hash. Held-out rows never train.
- Sampling: Poisson. Every step includes each training row independently with probability
  q = logical_batch_size / N; an empty draw is a noise-only step (utils/privacy.py PoissonSampler).
  Physical batches only split the draw for memory; with several processes every rank takes the same
  global draw and processes a disjoint share of it (utils/distributed.py), checked every step.
- Per step (Trainer.step): each row's loss is the mean over its own answer tokens; its gradient (LoRA
  weights only) is clipped to C = --max_grad_norm; the sum gets N(0, (sigma C)^2) noise once and is
  divided by the expected batch size.
- Accounting (plan_privacy): sigma is calibrated so that the accountant's epsilon after exactly the
  planned steps at this q is <= --epsilon at --delta (< 1/N); the accountant is stepped once per step
  and kept across resume; the loop never takes a step that would pass the target.
- Release: OUT/adapter/ (utils/run_dir.py) holds only the adapters, the tokenizer, NOTICE, the public
  privacy report and the model card. Everything derived from the data (losses, counts, fingerprints,
  checkpoints, logs, the noise seed) goes to OUT/private_run_record/, outside epsilon.
- User level (--privacy_unit user --user_column COL): the unit is one user, every row sharing COL;
  neighbours add or remove one user with all their rows. The split hashes the user id (all of a user's
  rows in one split); Poisson sampling is over users, q = logical_batch_size / N_users; each sampled
  user contributes at most K = --max_examples_per_user rows, chosen at random (seeded by (seed, step,
  user), or the CSPRNG); the user's gradient is the mean of its chosen rows' gradients, clipped to C as
  ONE vector (all its rows share one physical batch, so K <= --per_device_train_batch_size); noise once,
  divided by the expected number of users; the accountant runs at N_users and q_user, delta < 1/N_users.
  Memory: a physical batch must hold a user's K rows, and per-sample gradients are per row until they
  are summed per user (utils/privacy.py sum_grad_samples_by_user), so peak memory is as today's for
  a physical batch of that many rows.
- Group privacy (example unit with --user_column): the split still hashes the user id, so evaluation
  holds out whole users (a row's split depends on its own user id alone: one row added or removed still
  changes the training set by at most that row); an (eps, delta)-DP run protects a user with k rows
  at (k eps, k e^{(k-1) eps} delta), the standard group-privacy bound (Dwork and Roth 2014, Section 2.3;
  utils/privacy.py group_privacy, which derives it), printed and put in the private data summary
  for the largest user's k (computed at the target epsilon).
- Threat model: with the default seeded randomness the guarantee holds only against someone who does
  not know the seed; --secure_mode takes sampling and noise from the OS CSPRNG.

Run
    accelerate launch train_dp_lora.py --epsilon 3                                  # VaultGemma 1B, hub data
    python train_dp_lora.py --model gemma3-270m --dataset bundled --max_steps 20 \\
        --logical_batch_size 16 --per_device_train_batch_size 4 --report_to none    # offline demo
    python train_dp_lora.py --resume_from_checkpoint latest --output_dir outputs/dp_lora
    accelerate launch --config_file configs/accelerate_multi_gpu.yaml --num_processes 4 train_dp_lora.py --epsilon 3
"""

import collections
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from utils import cli, distributed, privacy, privacy_record, recipe, tracking, training
from utils.data import (
    BUNDLED_DATASET,
    DataError,
    SplitSpec,
    clean_rows,
    collate,
    fingerprint,
    is_local_source,
    check_user_column,
    group_by_user,
    read_rows,
)
from utils.data import split_cards, tokenize_cards
from utils.model_card import model_card
from utils.privacy_record import PrivacyRecord, format_epsilon, replace_one_epsilon
from utils.run_dir import (
    RunDir,
    RunDirError,
    atomic_directory,
    crash_point,
    read_json,
    write_bundle_contents,
    write_json_atomic,
)
from utils.train_args import GROUPS, parse_args, validate_against_data, validate_args  # noqa: F401 - GROUPS for --help tests

# Every metric sent to the tracker, and what it is computed from. Epsilon covers none of the
# data-dependent ones: they stay in the private run record's tracker logs.
LOGGED_METRICS = {
    "train/loss": "private: mean loss of the step's Poisson-sampled training rows",
    "train/lr": "public: the learning-rate schedule at this step",
    "privacy/epsilon": "public: the accountant's epsilon so far (function of q, sigma, steps, delta)",
    "privacy/delta": "public: the target delta",
    "eval/loss": "private: mean loss on the validation rows, which no DP guarantee covers",
}


@dataclass
class Data:
    train: list[dict]  # tokenized examples
    validation: list[dict]
    spec: SplitSpec
    summary: dict  # private: source, cleaning and split counts
    fingerprint: str  # private: identity of the cleaned dataset, for resume
    users: list[list[int]] | None = None  # private: each training user's example indices (user unit only)
    rows_per_user: list[int] | None = None  # private: with --user_column, training rows of each user


def prepare_data(args, tokenizer) -> Data:
    """Read, clean, split by keyed hash, tokenize; one line naming the problem if too few rows remain."""
    d, p = args.data, args.privacy
    rows = read_rows(d.dataset)
    column = p.user_column
    if column:
        check_user_column(d.dataset, rows, column)
    cards, cleaning = clean_rows(rows, user_column=column)
    by_user = p.privacy_unit == "user"
    spec = SplitSpec(
        d.split_seed,
        d.validation_fraction,
        d.test_fraction,
        d.train_sample_fraction,
        user_column=column,  # either unit: evaluation holds out whole users
    )
    split = split_cards(cards, spec)
    train, too_long_train = tokenize_cards(
        tokenizer, [cards[i] for i in split["train"]], d.max_seq_length, user_column=column
    )
    validation, too_long_val = tokenize_cards(
        tokenizer, [cards[i] for i in split["validation"]], d.max_seq_length
    )
    if len(train) < 2 and too_long_train:
        lengths = sorted(
            len(tokenizer(c["input"] + " " + c["output"])["input_ids"])
            for c in (cards[i] for i in split["train"])
        )
        raise DataError(
            f"{too_long_train} of {len(split['train'])} training rows are longer than --max_seq_length "
            f"{d.max_seq_length} tokens (lengths: min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
            f"max {lengths[-1]}, plus the prompt template); raise --max_seq_length"
        )
    source = (
        str(Path(d.dataset).resolve())
        if d.dataset != BUNDLED_DATASET and is_local_source(d.dataset)
        else d.dataset
    )
    summary = dict(
        cleaning,
        dataset=source,
        skipped_too_long=too_long_train + too_long_val,
        n_train=len(train),
        n_validation=len(validation),
        n_test=len(split["test"]),
        n_unsampled=len(split["unsampled"]),
    )
    users = rows_per_user = None
    if column:
        groups = group_by_user(train, "user")
        rows_per_user = [len(g) for g in groups]
        summary.update(
            user_column=column, n_train_users=len(groups), max_rows_per_user=max(rows_per_user, default=0)
        )
        if by_user:
            users = groups
            summary["rows_beyond_max_examples_per_user"] = sum(
                max(0, k - p.max_examples_per_user) for k in rows_per_user
            )  # never all used in one step; a different random K of them each time the user is drawn
        for example in train:
            del example["user"]
    return Data(train, validation, spec, summary, fingerprint(cards), users, rows_per_user)


def plan_privacy(
    args, n_train: int, world_size: int, spec: SplitSpec, n_users: int | None = None
) -> tuple[PrivacyRecord, int]:
    """The mechanism (q, sigma, delta, steps) and the step budget the accountant allows.

    At user level (n_users given) N is the number of training users: q = L / N_users, an epoch is
    N_users / L steps, the default delta is below 1/N_users; n_train stays the row count.
    """
    p, t = args.privacy, args.training
    n = n_users if n_users is not None else n_train
    q = t.logical_batch_size / n
    steps = privacy.planned_steps(n, t.logical_batch_size, t.num_train_epochs, t.max_steps)
    dp = not p.disable_dp
    delta = (p.delta if p.delta is not None else privacy.default_delta(n)) if dp else None
    sigma = privacy.calibrate_noise(p.epsilon, delta, q, steps, p.accountant) if dp else 0.0
    budget = privacy.step_budget(p.epsilon, delta, sigma, q, p.accountant, steps) if dp else steps
    record = PrivacyRecord(
        dp_enabled=dp,
        target_epsilon=p.epsilon if dp else None,
        delta=delta,
        noise_multiplier=sigma,
        sample_rate=q,
        max_grad_norm=p.max_grad_norm if dp else None,
        expected_batch_size=t.logical_batch_size,
        planned_steps=steps,
        accountant=p.accountant,
        n_train=n_train,
        secure_mode=p.secure_mode,
        world_size=world_size,
        draw_split=distributed.DRAW_SPLIT,
        split=spec.to_json(),
    )
    if n_users is not None:
        column = p.user_column
        record.unit = privacy_record.user_unit(column)
        record.neighbouring_relation = privacy_record.user_relation(column)
        record.user_column, record.n_users = column, n_users
        record.max_examples_per_user = p.max_examples_per_user
    return record, budget


def group_privacy_summary(args, record: PrivacyRecord, rows_per_user: list[int]) -> dict:
    """Example-level run with --user_column: what the guarantee says about the largest user (private)."""
    k = max(rows_per_user, default=0)
    summary = {"user_column": args.privacy.user_column, "largest_user_rows": k}
    if record.dp_enabled and k:
        epsilon, delta = privacy.group_privacy(record.target_epsilon, record.delta, k)
        summary.update(
            epsilon=epsilon,
            delta=delta,
            formula="(k eps, k e^((k-1) eps) delta) at the target eps and delta (group privacy)",
        )
    return summary


def run_identity(args, data: Data, tokenizer, model) -> dict:
    """Private facts a resume must match beyond the mechanism: the data, split, tokenizer, model and LoRA."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "dataset_fingerprint": data.fingerprint,
        "split": data.spec.to_json(),
        "max_seq_length": args.data.max_seq_length,
        "tokenizer": distributed.digest_hex(
            {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_ids}
        ),
        "model": distributed.digest_hex(
            {
                "name": args.model.model,
                "config": base.config.to_diff_dict(),
                "load_in_4bit": args.model.load_in_4bit,
            }
        ),
        "lora": dataclasses.asdict(args.lora),
        "optimizer": args.training.optimizer,  # its checkpointed state fits no other optimizer
        "seed": args.training.seed,
    }


class Trainer:
    """The DP-SGD step and everything it owns: optimizer, schedule, sampler, noise, accountant."""

    def __init__(self, args, record: PrivacyRecord, budget: int, model, tokenizer, data: Data, accelerator):
        p, t = args.privacy, args.training
        self.args, self.record, self.budget, self.model, self.tokenizer = (
            args,
            record,
            budget,
            model,
            tokenizer,
        )
        self.train, self.validation = data.train, data.validation
        self.device, self.world, self.rank = (
            accelerator.device,
            accelerator.num_processes,
            accelerator.process_index,
        )
        self.params = [x for x in model.parameters() if x.requires_grad]
        if self.world > 1:
            distributed.broadcast_lora_weights([w for _, w in training.lora_weights(model)])
        self.optimizer = training.make_optimizer(
            self.params, t.optimizer, t.learning_rate, t.weight_decay, t.momentum
        )
        self.scheduler = training.make_schedule(self.optimizer, record.planned_steps, t.warmup_ratio)
        self.noise_generator, self.accountant = None, None
        if record.dp_enabled:
            privacy.attach_per_sample_hooks(model, p.grad_sample_mode)
            if not p.secure_mode:
                self.noise_generator = torch.Generator(device=self.device).manual_seed(t.seed + 1)
            # with several processes: noise once, on rank 0; the all-reduced sum is divided by the logical batch once
            self.optimizer = privacy.make_dp_optimizer(
                self.optimizer,
                record.noise_multiplier,
                p.max_grad_norm,
                t.logical_batch_size,
                self.noise_generator,
                p.secure_mode,
                self.world,
            )
            self.accountant = privacy.make_accountant(p.accountant)
            self.optimizer.attach_step_hook(
                self.accountant.get_optimizer_hook_fn(sample_rate=record.sample_rate)
            )
            self.logged_epsilon = privacy.LoggedEpsilon(
                self.accountant,
                p.accountant,
                record.delta,
                t.epsilon_log_steps,
                min(record.planned_steps, budget),
            )
        self.users = data.users  # None: example level
        self.sampler = privacy.PoissonSampler(
            len(self.users) if self.users is not None else len(self.train),
            record.sample_rate,
            t.seed,
            secure_mode=p.secure_mode,
        )
        self.lengths = [len(e["input_ids"]) for e in self.train]
        if self.users is not None:  # a user's longest row: how users are dealt to ranks and batched
            self.user_lengths = [max(self.lengths[r] for r in rows) for rows in self.users]
        self.counters = {"empty_steps": 0, "nonfinite_examples": 0}  # private: they depend on the data
        self.recent_losses = collections.deque(maxlen=t.loss_window)

    def user_batches(self, mine: list[int], step: int) -> list[tuple[list[int], list[int]]]:
        """This rank's sampled users as physical batches of (rows, user of each row), at most K rows each."""
        p, t = self.args.privacy, self.args.training
        chosen = [
            privacy.choose_user_rows(self.users[u], p.max_examples_per_user, t.seed, step, u, p.secure_mode)
            for u in mine
        ]
        return privacy.user_physical_batches(chosen, self.lengths, t.per_device_train_batch_size)

    def step(self, step: int) -> float:
        """Step `step`: its Poisson draw (rows, or users at user level) as one logical batch; backward per
        physical batch, clip and accumulate, noise once. Returns the step's loss."""
        dp, t = self.record.dp_enabled, self.args.training
        drawn = distributed.global_draw(self.sampler, step, self.device, self.world)
        by_user = self.users is not None
        mine = distributed.split_draw(
            drawn, self.user_lengths if by_user else self.lengths, self.rank, self.world
        )
        if by_user:
            batches, owners = zip(*self.user_batches(mine, step)) if mine else ((), ())
        else:
            batches, owners = (
                privacy.physical_batches(mine, self.lengths, t.per_device_train_batch_size),
                None,
            )
        losses = []
        for i, rows in enumerate(batches):
            batch = {
                k: v.to(self.device)
                for k, v in collate([self.train[r] for r in rows], self.tokenizer.pad_token_id).items()
            }
            weights = None
            if by_user:  # sum over rows of loss_row / k_u: each user's summed gradient is its rows' mean
                user_of_row = torch.tensor(owners[i])
                counts = torch.bincount(user_of_row)
                weights = (1.0 / counts[user_of_row].double()).to(self.device)
            example_losses, nonfinite = training.backward_examples(
                self.model, batch, self.params, dp, t.logical_batch_size, weights
            )
            if by_user and dp:  # one per-sample gradient per user: the DP optimizer clips each user to C
                privacy.sum_grad_samples_by_user(self.params, user_of_row, len(counts))
            losses.append(example_losses)
            self.counters["nonfinite_examples"] += nonfinite
            # clip and accumulate this physical batch; noise once per logical batch
            if dp and i < len(batches) - 1:
                self.optimizer.signal_skip_step(do_skip=True)
                self.optimizer.step()
                self.optimizer.zero_grad()
            if i == 0:
                crash_point(f"step_{self.scheduler.last_epoch + 1}:mid")  # test-only (utils/run_dir.py)
        # an empty draw, or an empty share of it: this rank still steps and joins the all-reduce
        if not batches:
            self.counters["empty_steps"] += int(not drawn)
            privacy.prepare_empty_step(self.params, dp)
        if self.world > 1 and not dp:
            distributed.sum_gradients(self.params)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_losses = torch.cat(losses) if losses else torch.empty(0)
        if self.world == 1:
            finite = step_losses[torch.isfinite(step_losses)]
            loss = finite.mean().item() if len(finite) else float("nan")
        else:
            processed = mine if by_user else [r for b in batches for r in b]  # users, or rows
            loss = distributed.step_totals(step_losses, drawn, processed, self.device)
        if math.isfinite(loss):
            self.recent_losses.append(loss)
        return loss

    def epsilon(self, steps_taken: int) -> float:
        return self.logged_epsilon.after(steps_taken) if self.record.dp_enabled else float("inf")

    def mean_recent_loss(self) -> float:
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else float("nan")

    def eval_loss(self) -> float:
        if not self.validation:
            return float("nan")
        t = self.args.training
        losses = training.answer_nll(
            self.model,
            distributed.shard(self.validation, self.rank, self.world),
            t.per_device_train_batch_size,
            self.tokenizer.pad_token_id,
        )
        mean = sum(losses) / len(losses) if losses else float("nan")
        return mean if self.world == 1 else distributed.mean_across_ranks(mean, len(losses), self.device)

    def record_at(self, steps_taken: int, selection: str | None = None) -> PrivacyRecord:
        """The privacy record as of `steps_taken`; replace-one epsilon (1-2 s) only in a checkpoint or the end."""
        history = [tuple(h) for h in self.accountant.history] if self.accountant else []
        record = dataclasses.replace(
            self.record,
            steps_taken=steps_taken,
            accountant_history=history,
            selected_on_private_data=selection is not None,
            selection=selection,
        )
        if record.dp_enabled:
            delta = record.delta
            record.epsilon = privacy.accountant_epsilon(self.accountant, delta) if history else 0.0
            record.epsilon_rdp = privacy.epsilon_after(
                steps_taken, record.noise_multiplier, record.sample_rate, delta, "rdp"
            )
            record.epsilon_replace_one = replace_one_epsilon(history, delta) if history else 0.0
            if record.forks:  # each earlier branch is assumed to run to the planned end
                fork_steps = record.forks * (record.planned_steps - record.lineage[-1]["resumed_at_step"])
                record.epsilon_with_forks = privacy.epsilon_after(
                    steps_taken + fork_steps,
                    record.noise_multiplier,
                    record.sample_rate,
                    delta,
                    record.accountant,
                )
        return record

    def state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": training.rng_state(self.noise_generator),
        }

    def restore(self, state: dict, accountant_history) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        training.restore_rng_state(
            distributed.rng_state_for_rank(state, self.rank, self.world), self.noise_generator
        )
        if self.accountant is not None:
            self.accountant.history = [tuple(h) for h in accountant_history]


# -----------------------------------------------------------------------------
# checkpoints, resume and the release


def save_checkpoint(
    run: RunDir,
    trainer: Trainer,
    step: int,
    record: PrivacyRecord,
    identity: dict,
    resolved: dict,
    counters: dict,
    rng_per_rank=None,
) -> None:
    """Everything a resume needs, as one atomic step_NNNNNN/ directory in the private run record."""

    def write(tmp):
        write_bundle(tmp / "adapter", trainer, record, resolved)
        torch.save(
            dict(trainer.state(), step=step, **({"rng_per_rank": rng_per_rank} if rng_per_rank else {})),
            tmp / "training_state.pt",
        )
        write_json_atomic(tmp / "privacy_record.json", record.to_json())
        write_json_atomic(tmp / "run_identity.json", identity)
        write_json_atomic(tmp / "counters.json", counters)

    atomic_directory(run.checkpoint(step), write)


def write_bundle(directory: Path, trainer: Trainer, record: PrivacyRecord, resolved: dict) -> None:
    card = model_card(
        record,
        resolved["model"]["model"],
        trainer.model.peft_config["default"].to_dict(),
        record.split,  # the public split spec: seed, fractions, and whether it hashed user ids
    )
    write_bundle_contents(directory, trainer.model, trainer.tokenizer, record.to_json(), card)


def resume(run: RunDir, args, trainer: Trainer, identity: dict) -> int:
    """Restore a checkpoint made with the same mechanism, threat model, split, model and LoRA; its step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = run.find_checkpoint(args.training.resume_from_checkpoint)
    saved = PrivacyRecord.read(path / "privacy_record.json")
    saved_identity = read_json(path / "run_identity.json")
    problems = trainer.record.compatible_with(saved) + [
        f"{key}: checkpoint {saved_identity.get(key)!r} vs now {identity[key]!r}"
        for key in identity
        if saved_identity.get(key) != identity[key]
    ]
    if problems:
        raise cli.ArgumentErrors([f"cannot resume from {path}: {problem}" for problem in problems])
    resumes_file = path / "resumes.json"
    earlier = read_json(resumes_file)["resumes"] if resumes_file.is_file() else []
    forks = saved.forks
    # a seeded resume replays the same draws and noise; a secure one does not
    if saved.secure_mode and earlier:
        if not args.privacy.accept_forked_resume:
            raise cli.ArgumentErrors(
                [
                    f"{path} was already resumed {len(earlier)} time(s) in --secure_mode: another branch "
                    "from it spends "
                    "more than one run's epsilon; pass --accept_forked_resume to accept the composed cost "
                    "(then reported)"
                ]
            )
        forks += len(earlier)
    state = torch.load(path / "training_state.pt", weights_only=False)
    set_peft_model_state_dict(trainer.model, load_file(str(path / "adapter" / "adapter_model.safetensors")))
    trainer.restore(state, saved.accountant_history)
    trainer.counters.update(read_json(path / "counters.json"))
    trainer.record.lineage = saved.lineage + [
        {"resumed_at_step": state["step"], "secure_mode": saved.secure_mode}
    ]
    trainer.record.forks = forks
    if trainer.rank == 0:
        write_json_atomic(resumes_file, {"resumes": earlier + [{"at": time.strftime("%Y-%m-%dT%H:%M:%S")}]})
    return state["step"]


def gather_rng(trainer: Trainer):
    """Every rank's RNG state for a checkpoint (collective), or None with one process."""
    return (
        distributed.gather_rng_states(training.rng_state(trainer.noise_generator))
        if trainer.world > 1
        else None
    )


def summed_counters(trainer: Trainer) -> dict:
    if trainer.world == 1:
        return dict(trainer.counters)
    (nonfinite,) = distributed.sum_across_ranks([trainer.counters["nonfinite_examples"]], trainer.device)
    return dict(trainer.counters, nonfinite_examples=int(nonfinite))  # empty_steps are global already


def run_summary(args, trainer: Trainer, data: Data, start_step: int) -> str:
    m, t, r = args.model, args.training, trainer.record
    n_trainable = sum(x.numel() for x in trainer.params)
    n_total = sum(x.numel() for x in trainer.model.parameters())
    privacy_line = (
        f"  target (epsilon, delta) = ({args.privacy.epsilon}, {r.delta:.3g}); noise multiplier = "
        f"{r.noise_multiplier:.4f}; "
        f"clip norm = {args.privacy.max_grad_norm}; accountant = {r.accountant}; {r.threat_model}"
        if r.dp_enabled
        else "  NO privacy guarantee: --disable_dp"
    )
    return (
        f"***** Running {'DP' if r.dp_enabled else 'NON-PRIVATE'} LoRA training *****\n"
        f"  model {m.model} on {trainer.device}"
        + (f" and {trainer.world - 1} more processes" if trainer.world > 1 else "")
        + f"; trainable {n_trainable:,} of {n_total:,} parameters ({100 * n_trainable / n_total:.3f}%)\n"
        + (
            f"  N (training users, `{r.user_column}`) = {r.n_users}, holding {r.n_train} rows; at most "
            f"{r.max_examples_per_user} rows of a sampled user per step\n"
            if r.user_column
            else ""
        )
        + f"  N (training rows) = {r.n_train}; validation {len(data.validation)}; test {data.summary['n_test']}\n"
        f"  skipped rows: {data.summary['skipped_empty']} empty, {data.summary['duplicates_dropped']} duplicates, "
        f"{data.summary['skipped_too_long']} too long\n"
        f"  logical batch (expected) = {t.logical_batch_size}, physical batch = {t.per_device_train_batch_size}, "
        f"sample rate q = {r.sample_rate:.5f}\n"
        f"  {data.summary['recipe']}\n"
        f"  steps = {r.planned_steps} (from step {start_step})"
        + (f", step budget = {trainer.budget}\n" if r.dp_enabled else "\n")
        + privacy_line
    )


# -----------------------------------------------------------------------------


@dataclass
class Session:
    """The process's place in the run: its accelerator (rank, device), the run directory, and how it prints."""

    accelerator: object
    run: RunDir
    say: object  # print on global rank 0, nothing elsewhere
    wandb_mode: str | None


def start_session(args) -> Session:
    """Check the output directory (nothing is written yet) and start Accelerate and the seeds."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = args.training
    run = RunDir(t.output_dir)
    if not t.resume_from_checkpoint and run.holds_a_run() and not t.overwrite_output_dir:
        raise RunDirError(
            f"{run.root} already holds a run; pass --overwrite_output_dir to replace it, "
            "or --resume_from_checkpoint latest to continue it"
        )
    if t.resume_from_checkpoint:  # a missing checkpoint is one line at once, before model and data load
        run.find_checkpoint(t.resume_from_checkpoint)
    wandb_mode = tracking.prepare_wandb_environment() if t.report_to == "wandb" else None
    accelerator = Accelerator(
        log_with=tracking.tracker_names(t.report_to) or None,
        project_dir=str(run.tracking_dir),
        cpu=distributed.needs_cpu_backend(),
    )
    distributed.check_launch(accelerator)
    set_seed(t.seed, device_specific=True)  # rank r: seed + r (dropout); LoRA init comes from rank 0
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    return Session(accelerator, run, say, wandb_mode)


def set_up(args, session: Session) -> tuple[Trainer, Data, dict, int]:
    """Data, plan, model and optimizer, and the checkpoint to resume from: (trainer, data, identity, start step)."""
    from utils.model_loading import load_tokenizer

    accelerator = session.accelerator
    tokenizer = load_tokenizer(args.model.model)
    data = prepare_data(args, tokenizer)
    n_users = len(data.users) if data.users is not None else None
    n = n_users if n_users is not None else len(data.train)
    data.summary["recipe"] = recipe.apply(args, n)  # the unset levers, from N and epsilon
    validate_against_data(args, n)
    record, budget = plan_privacy(args, len(data.train), accelerator.num_processes, data.spec, n_users)
    if data.rows_per_user is not None and n_users is None:
        data.summary["group_privacy"] = group_privacy_summary(args, record, data.rows_per_user)
    model = build_model(args, tokenizer, accelerator.device, accelerator.mixed_precision)
    identity = run_identity(args, data, tokenizer, model)
    if accelerator.num_processes > 1:  # nodes reading other data or tokenizers would process other rows
        lengths = [len(e["input_ids"]) for e in data.train]
        distributed.check_same_on_all_ranks(
            "the privacy plan, data and tokenizer", [record.to_json(), identity, lengths], accelerator.device
        )
    trainer = Trainer(args, record, budget, model, tokenizer, data, accelerator)
    start_step = resume(session.run, args, trainer, identity) if args.training.resume_from_checkpoint else 0
    return trainer, data, identity, start_step


def open_run(args, session: Session, trainer: Trainer, data: Data, start_step: int) -> dict:
    """The run is known to start: only now is anything written. Returns the resolved arguments."""
    t, run, accelerator = args.training, session.run, session.accelerator
    resolved = cli.to_dict(args)
    if accelerator.is_main_process:
        run.open_private() if t.resume_from_checkpoint else run.start(overwrite=t.overwrite_output_dir)
        write_json_atomic(run.args_file, resolved)
        write_json_atomic(run.data_summary_file, data.summary)
    accelerator.wait_for_everyone()
    accelerator.init_trackers(
        t.project_name,
        config=tracking.flatten_config(resolved),
        init_kwargs=tracking.tracker_init_kwargs(t.report_to, str(run.tracking_dir)),
    )
    session.say(run_summary(args, trainer, data, start_step))
    if "group_privacy" in data.summary and trainer.record.dp_enabled:
        g = data.summary["group_privacy"]
        session.say(
            f"  group privacy (example unit): a user of `{g['user_column']}` with {g['largest_user_rows']} rows "
            f"(the largest) is protected only at (k eps, k e^((k-1) eps) delta) = "
            f"({format_epsilon(g['epsilon'])}, {g['delta']:.3g}); use --privacy_unit user to protect whole users"
        )
    if session.wandb_mode == "offline":
        session.say(f"  W&B: offline, run stored in {tracking.wandb_run_dir(accelerator)}")
    elif session.wandb_mode:
        session.say(f"  W&B: {session.wandb_mode}")
    return resolved


def main(args) -> dict:
    from tqdm.auto import tqdm

    validate_args(args)
    session = start_session(args)
    trainer, data, identity, start_step = set_up(args, session)
    resolved = open_run(args, session, trainer, data, start_step)
    t, record, accelerator = args.training, trainer.record, session.accelerator

    trainer.model.train()
    progress = tqdm(
        total=record.planned_steps, initial=start_step, disable=not accelerator.is_main_process, desc="train"
    )
    steps_taken = start_step
    for step in range(start_step, record.planned_steps):
        if step >= trainer.budget:
            session.say(
                f"Stopping before step {step + 1}: it would take epsilon past the target {record.target_epsilon}"
            )
            break
        loss = trainer.step(step)  # draw, then clip, noise once, step
        steps_taken = step + 1
        epsilon = trainer.epsilon(steps_taken)
        metrics = {"train/loss": loss, "train/lr": trainer.scheduler.get_last_lr()[0],
                   "privacy/epsilon": epsilon, "privacy/delta": record.delta}  # fmt: skip
        if t.eval_steps and steps_taken % t.eval_steps == 0 and data.validation:
            metrics["eval/loss"] = trainer.eval_loss()
        accelerator.log({k: v for k, v in metrics.items() if v is not None}, step=steps_taken)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3f}", eps=progress_epsilon(record, epsilon))
        maybe_checkpoint(session.run, trainer, steps_taken, loss, identity, resolved, accelerator)
    progress.close()
    results = finish(session.run, trainer, steps_taken, identity, resolved, accelerator, data)
    session.say(final_summary(session.run, trainer, results))
    return results


def build_model(args, tokenizer, device, mixed_precision="no"):
    """The LoRA model the arguments describe (utils/training.py)."""
    dtype = training.compute_dtype(args.model.dtype, mixed_precision, device)
    return training.build_lora_model(
        args.model.model, args.lora, tokenizer, device, dtype=dtype, load_in_4bit=args.model.load_in_4bit
    )


def progress_epsilon(record: PrivacyRecord, epsilon: float) -> str:
    if not record.dp_enabled:
        return "inf (no DP)"
    return f"<={format_epsilon(epsilon)}" + ("" if record.secure_mode else " seeded")


def maybe_checkpoint(run, trainer, step, loss, identity, resolved, accelerator) -> None:
    """Checkpoint every --save_steps, and when the loss passes --save_loss_threshold (the same on every rank)."""
    t = trainer.args.training
    selected = t.save_loss_threshold is not None and math.isfinite(loss) and loss < t.save_loss_threshold
    if not ((t.save_steps and step % t.save_steps == 0) or selected):
        return
    selection = (
        f"training loss {loss:.4f} < --save_loss_threshold {t.save_loss_threshold}" if selected else None
    )
    rng_per_rank = gather_rng(trainer)
    counters = summed_counters(trainer)
    if accelerator.is_main_process:
        save_checkpoint(
            run, trainer, step, trainer.record_at(step, selection), identity, resolved, counters, rng_per_rank
        )


def finish(
    run: RunDir, trainer: Trainer, steps_taken: int, identity: dict, resolved: dict, accelerator, data: Data
) -> dict:
    """Final evaluation, then the final checkpoint, the release bundle and the private results, each atomic."""
    eval_loss = trainer.eval_loss()
    rng_per_rank = gather_rng(trainer)
    counters = summed_counters(trainer)
    distributed.assert_not_wrapped(trainer.model)
    replicas_identical = distributed.replicas_identical(trainer.params) if trainer.world > 1 else True
    record = trainer.record_at(steps_taken)
    results = {
        "train/loss": trainer.mean_recent_loss(),
        "train/loss_window_steps": len(trainer.recent_losses),
        "eval/loss": eval_loss,
        "privacy/epsilon": record.epsilon,
        "privacy/delta": record.delta,
        "steps": steps_taken,
        "stopped_by_budget": steps_taken < record.planned_steps,
        "counters": counters,
        "data": data.summary,
        "world_size": trainer.world,
        "replicas_identical": replicas_identical,
        "trainable_parameters": sum(x.numel() for x in trainer.params),
    }
    accelerator.log({"eval/loss": eval_loss}, step=steps_taken)
    if accelerator.is_main_process:
        # a last step on the --save_steps grid was saved by the loop already, with its selection reason
        if not run.checkpoint(steps_taken).is_dir():
            save_checkpoint(run, trainer, steps_taken, record, identity, resolved, counters, rng_per_rank)
        atomic_directory(run.bundle, lambda tmp: write_bundle(tmp, trainer, record, resolved))
        write_json_atomic(run.results_file, results)
    accelerator.wait_for_everyone()  # every rank returns only once the outputs exist
    results["wandb_run_dir"] = (
        tracking.wandb_run_dir(accelerator) if trainer.args.training.report_to == "wandb" else None
    )
    accelerator.end_training()
    results["record"] = record
    return results


def final_summary(run: RunDir, trainer: Trainer, results: dict) -> str:
    record, counters = results["record"], results["counters"]
    lines = [
        f"Done: {results['steps']} steps, train loss {results['train/loss']:.4f} (mean of the last "
        f"{results['train/loss_window_steps']} steps), eval loss {results['eval/loss']:.4f}",
        f"  {record.guarantee_line()}",
        f"  release bundle (share this): {run.bundle}",
        f"  private run record (never share; outside epsilon): {run.private}",
    ]
    if not results["replicas_identical"]:
        lines.append("  WARNING: ranks ended with different LoRA weights; the saved adapters are rank 0's")
    if results["wandb_run_dir"]:
        lines.append(
            f"  W&B run: {results['wandb_run_dir']}; upload with `wandb sync {results['wandb_run_dir']}`"
        )
    if counters["empty_steps"] or counters["nonfinite_examples"]:
        lines.append(
            f"  {counters['empty_steps']} empty Poisson draws (noise-only steps), {counters['nonfinite_examples']} "
            "examples with a NaN/inf loss or gradient left out"
        )
    return "\n".join(lines)


def cli_main(argv=None) -> int:
    return cli.run_main(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli_main())
