"""RLVR throughput: tracetune's GRPO rollouts against TRL's default generation path, in one run.

Both arms train the same model with `GRPOTrainer` on the same support-desk tasks, with the same
group size, temperature, per-episode turn limit and learning rate; only the rollouts differ:

* trl: TRL's own multi-turn tool loop (`environment_factory=`): the environment's tools as
  Python methods (schemas derived from their signatures and docstrings), `model.generate` for
  each tool round, the reward from the environment's verifier on the final answer;
* tracetune: `rollout_func=` with our rollout engine (`tracetune.training.grpo`): a batched
  KV-cached decode loop with a shared system-prompt cache, token-in/token-out episodes, the
  same parser and verifier as evaluation.

Threads: the TRL arm runs at torch's default threads (what a plain user gets). The `tracetune`
arm runs at torch's default threads too (the engine's automatic policy switched off), so the
pair differs only in the rollout path; `tracetune_auto` is the same with the engine's own policy
(one thread for a small model's small forwards, torch's count for the wide ones while the
machine has room), reported separately and labelled. The arms take turns `--repeat` times;
medians are reported, and the record (bench/results/bench_grpo.json) names both sides' settings.

Reported per arm: rollout episodes per second inside RLVR (episodes generated / seconds spent
generating them, tool execution included), seconds per GRPO step (rollouts + scoring + the
optimizer step), the share of the step spent in rollouts, and the episodes' success rate and
tool calls per episode (a sanity check that both arms run the same kind of episodes).

    .venv/bin/python bench/bench_grpo.py --model models/sft/merged --steps 4 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _record import Figure, print_figures, start_record, write_record

from tracetune.config import RLVRParams
from tracetune.environments.base import Call
from tracetune.environments.support_desk import SupportDesk

FAMILIES = ("order_status", "order_total_fx", "customer_tier", "missing_order")


class DeskTools:
    """The support desk as TRL's `environment_factory` wants it: one method per tool.

    TRL derives each tool's JSON schema from these signatures and docstrings
    (`transformers.utils.get_json_schema`); the descriptions match the environment's. Every
    call goes through `SupportDesk.step`, so arguments are validated and errors are the same
    JSON messages our engine shows.
    """

    def __init__(self) -> None:
        self.env = SupportDesk(max_steps=15)
        self.tasks: dict[str, Any] = {}

    def reset(self, **kwargs: Any) -> None:
        task_id = kwargs["task_id"]
        if task_id not in self.tasks:
            self.tasks[task_id] = self.env.task_by_id(task_id)
        self.env.reset(self.tasks[task_id])

    def _run(self, name: str, **arguments: Any) -> str:
        return self.env.step(Call(name, arguments)).content

    def get_customer(self, customer_id: str) -> str:
        """Get a customer by id.

        Args:
            customer_id: the customer id
        """
        return self._run("get_customer", customer_id=customer_id)

    def find_customer(self, email: str) -> str:
        """Find a customer by email.

        Args:
            email: the email
        """
        return self._run("find_customer", email=email)

    def get_order(self, order_id: str) -> str:
        """Get an order with its items.

        Args:
            order_id: the order id
        """
        return self._run("get_order", order_id=order_id)

    def list_orders(self, customer_id: str) -> str:
        """List a customer's orders, oldest first.

        Args:
            customer_id: the customer id
        """
        return self._run("list_orders", customer_id=customer_id)

    def search_products(self, query: str) -> str:
        """Search products by name.

        Args:
            query: the query
        """
        return self._run("search_products", query=query)

    def calculate(self, expression: str) -> str:
        """Evaluate + - * / arithmetic.

        Args:
            expression: the expression
        """
        return self._run("calculate", expression=expression)

    def convert_currency(self, amount: float, from_currency: str, to_currency: str) -> str:
        """Convert an amount between currencies.

        Args:
            amount: the amount
            from_currency: the source currency (choices: ["CAD", "EUR", "GBP", "JPY", "USD"])
            to_currency: the target currency (choices: ["CAD", "EUR", "GBP", "JPY", "USD"])
        """
        return self._run(
            "convert_currency", amount=amount, from_currency=from_currency, to_currency=to_currency
        )

    def update_order_status(self, order_id: str, status: str) -> str:
        """Set an order's status to cancelled or refunded.

        Args:
            order_id: the order id
            status: the new status (choices: ["cancelled", "refunded"])
        """
        return self._run("update_order_status", order_id=order_id, status=status)


def final_answer(completion: list[dict[str, Any]]) -> str | None:
    """The last assistant message without tool calls (TRL's conversational completion)."""
    for message in reversed(completion):
        if message.get("role") == "assistant" and not message.get("tool_calls"):
            return str(message.get("content") or "")
    return None


def verifier_reward(
    completions: list[Any], environments: list[DeskTools], **kw: Any
) -> list[float | None]:
    """The verifier's +1 / -1 on each episode's final answer and world state."""
    return [
        env.env.verify(final_answer(c)).reward
        for c, env in zip(completions, environments, strict=True)
    ]


class Timer:
    """Wraps `trainer._generate` (both arms generate there) and times the optimizer steps."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self
        self.generate_s: list[float] = []
        self.episodes: list[int] = []
        self.step_s: list[float] = []
        self._last = 0.0

        class StepClock(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                timer._last = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                timer.step_s.append(time.perf_counter() - timer._last)

        self.callback = StepClock()

    def wrap(self, trainer: Any) -> None:
        inner = trainer._generate

        def timed(prompts: list[Any]) -> Any:
            started = time.perf_counter()
            out = inner(prompts)
            self.generate_s.append(time.perf_counter() - started)
            self.episodes.append(len(prompts))
            return out

        trainer._generate = timed


ARMS = ("trl", "tracetune", "tracetune_auto")


@contextmanager
def engine_threads(auto: bool) -> Iterator[None]:
    """The rollout engine at torch's default threads (auto=False) or its own policy (True)."""
    from tracetune.agent import rollout

    if auto:
        yield
        return
    saved = rollout.auto_cpu_threads
    rollout.auto_cpu_threads = lambda model: None
    try:
        yield
    finally:
        rollout.auto_cpu_threads = saved


def describe(name: str, rl: RLVRParams) -> str:
    """An arm's settings in words (threads, rollout path, GRPO settings)."""
    import torch

    threads = {
        "trl": f"torch threads {torch.get_num_threads()} (default)",
        "tracetune": f"torch threads {torch.get_num_threads()} (default; engine policy off)",
        "tracetune_auto": "the engine's thread policy (1 thread for small forwards, torch's "
        f"{torch.get_num_threads()} for wide ones when the machine has room)",
    }[name]
    path = (
        "TRL environment_factory tool loop, model.generate per tool round"
        if name == "trl"
        else "rollout_func= tracetune's batched KV-cached engine"
    )
    return (
        f"{threads}; {path}; {rl.steps} GRPO steps, {rl.tasks_per_step} tasks x group "
        f"{rl.group_size}, temperature {rl.temperature}, lr {rl.learning_rate:g}, "
        f"{rl.max_episode_steps} turns, {rl.max_completion_tokens} completion tokens, fp32"
    )


def run_arm(
    name: str, model_path: str, tasks: list[Any], rl: RLVRParams, out: Path
) -> dict[str, Any]:
    with engine_threads(auto=name == "tracetune_auto"):
        return _run_arm(name, model_path, tasks, rl, out)


def _run_arm(
    name: str, model_path: str, tasks: list[Any], rl: RLVRParams, out: Path
) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tracetune.agent.model import load_model
    from tracetune.agent.rollout import env_factory_from_params
    from tracetune.config import EnvironmentParams
    from tracetune.training.grpo import EpisodeRollout, task_dataset, trainer_class
    from tracetune.training.rewards import reward_functions

    model, tokenizer = load_model(model_path)
    model.train()
    timer = Timer()
    common: dict[str, Any] = {
        "output_dir": str(out / name),
        "max_steps": rl.steps,
        "learning_rate": rl.learning_rate,
        "per_device_train_batch_size": rl.group_size * rl.tasks_per_step,
        "num_generations": rl.group_size,
        "temperature": rl.temperature,
        "beta": rl.beta,
        "max_completion_length": rl.max_completion_tokens,
        "bf16": False,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": rl.seed,
        "disable_tqdm": True,
    }
    rollout = None
    if name == "trl":
        if getattr(tokenizer, "response_template", None) is None:
            # A saved tokenizer keeps our template but not the parsing spec TRL's loop needs.
            from tracetune.agent.template import RESPONSE_TEMPLATE

            tokenizer.response_template = RESPONSE_TEMPLATE
        rows = [
            {
                "prompt": [
                    {"role": "system", "content": SupportDesk.system_prompt},
                    {"role": "user", "content": t.goal},
                ],
                "task_id": t.id,
            }
            for t in tasks
        ]
        config = GRPOConfig(**common, max_tool_calling_iterations=rl.max_episode_steps - 1)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=verifier_reward,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            environment_factory=DeskTools,
            callbacks=[timer.callback],
        )
    else:
        funcs, weights = reward_functions(rl.rewards)
        rollout = EpisodeRollout(tokenizer, env_factory_from_params(EnvironmentParams()), tasks, rl)
        config = GRPOConfig(**common, reward_weights=weights)
        trainer = trainer_class()(
            model=model,
            reward_funcs=funcs,
            args=config,
            train_dataset=task_dataset(tasks),
            processing_class=tokenizer,
            rollout_func=rollout,
            callbacks=[timer.callback],
        )
    timer.wrap(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    episodes, gen_s = sum(timer.episodes), sum(timer.generate_s)
    step_s = statistics.mean(timer.step_s)
    outcome = "rewards/verifier_reward/mean" if name == "trl" else "rewards/outcome/mean"
    calls = [h.get("tools/call_frequency", h.get("health/calls_per_episode")) for h in logs]
    return {
        "arm": name,
        "steps": len(timer.step_s),
        "episodes": episodes,
        "rollout_s": round(gen_s, 2),
        "episodes_per_s": round(episodes / gen_s, 3),
        "s_per_step": round(step_s, 2),
        "rollout_share": round(gen_s / sum(timer.step_s), 3),
        "reward_mean": round(statistics.mean(h["reward"] for h in logs), 3),
        "success_rate": round(statistics.mean((h[outcome] + 1) / 2 for h in logs), 3),
        "tool_calls_per_episode": round(statistics.mean(c or 0.0 for c in calls), 3),
        "model_tokens_per_episode": round(
            statistics.mean(h["completions/mean_length"] for h in logs), 1
        ),
    }


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def figures(runs: dict[str, list[dict[str, Any]]], settings: dict[str, str]) -> list[Figure]:
    """Each tracetune arm against the TRL arm: rollout episodes/s and seconds per GRPO step."""
    out = []
    trl = runs["trl"]
    for arm, label in (
        ("tracetune", "both at default threads"),
        ("tracetune_auto", "ours at its own thread policy"),
    ):
        if arm not in runs:
            continue
        ours = runs[arm]
        sanity = (
            f"success {_median(ours, 'success_rate')} vs {_median(trl, 'success_rate')}, "
            f"tool calls/episode {_median(ours, 'tool_calls_per_episode')} vs "
            f"{_median(trl, 'tool_calls_per_episode')}, model tokens/episode "
            f"{_median(ours, 'model_tokens_per_episode')} vs "
            f"{_median(trl, 'model_tokens_per_episode')}; median of {len(ours)} interleaved runs"
        )
        eps, ref_eps = _median(ours, "episodes_per_s"), _median(trl, "episodes_per_s")
        step, ref_step = _median(ours, "s_per_step"), _median(trl, "s_per_step")
        out += [
            Figure(
                name=f"RLVR rollout episodes/s vs TRL environment_factory, {label}",
                value=eps,
                unit="episodes/s",
                ours=f"{arm}: {settings[arm]}",
                reference=f"trl: {settings['trl']}",
                reference_value=ref_eps,
                ratio=round(eps / ref_eps, 2),
                note=sanity,
            ),
            Figure(
                name=f"GRPO seconds per step vs TRL environment_factory, {label} (ratio: x faster)",
                value=step,
                unit="s/step",
                ours=f"{arm}: {settings[arm]}",
                reference=f"trl: {settings['trl']}",
                reference_value=ref_step,
                ratio=round(ref_step / step, 2),
                note="ratio = reference seconds per step / ours; rollout share "
                f"{_median(ours, 'rollout_share')} vs {_median(trl, 'rollout_share')}",
            ),
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/sft/merged", help="the policy to train (a path)")
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps per arm")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tasks-per-step", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tracetune: per turn")
    ap.add_argument("--turns", type=int, default=6, help="assistant turns per episode")
    ap.add_argument("--max-completion", type=int, default=1024, help="tokens after the prompt")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all arms, interleaved")
    ap.add_argument("--out", default="/tmp/tracetune-bench-grpo")
    args = ap.parse_args()
    record = start_record("bench_grpo")
    rl = RLVRParams(
        steps=args.steps,
        group_size=args.group,
        tasks_per_step=args.tasks_per_step,
        max_new_tokens=args.max_new_tokens,
        max_episode_steps=args.turns,
        max_completion_tokens=args.max_completion,
        learning_rate=1e-5,
        beta=0.0,
    )
    tasks = SupportDesk().tasks(args.steps * args.tasks_per_step, seed=1, families=args.families)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in args.arms}
    for round_ in range(max(1, args.repeat)):
        for arm in args.arms:
            print(f"== round {round_ + 1}, {arm}", flush=True)
            runs[arm].append(run_arm(arm, args.model, tasks, rl, Path(args.out)))
            print(runs[arm][-1], flush=True)
        # Written after every round: a run cut short still leaves its finished rounds.
        report(record, runs, args, rl, round_ + 1)


def report(
    record: Any, runs: dict[str, list[dict[str, Any]]], args: Any, rl: RLVRParams, rounds: int
) -> None:
    """Print both sides' settings and the figures; write the record (TRL and another arm)."""
    settings = {arm: describe(arm, rl) for arm in runs}
    print(json.dumps({"model": args.model, "settings": vars(args), "runs": runs}, indent=2))
    print("\nsettings:")
    for arm, words in settings.items():
        print(f"  {arm}: {words}")
    if "trl" in runs and len(runs) > 1:
        figs = figures(runs, settings)
        print_figures(figs)
        details = {
            "budget": f"{args.steps} GRPO steps per arm x {rounds} of {max(1, args.repeat)} "
            f"rounds, {args.tasks_per_step} tasks x {args.group} episodes per step",
            "model": args.model,
            "settings": settings,
            "runs": runs,
        }
        print(f"record: {write_record(record, figs, details)}", flush=True)


if __name__ == "__main__":
    main()
