"""Traffic for the render stack: real Azure LLM arrivals, three tenants, tasks that report outcomes.

Arrival times and lengths come from the Azure LLM inference trace (conversation
set), sped up; each arrival starts one task of a workflow: one to three calls
through the official openai SDK (streamed or not, some prompts repeated so the
cache hits), then a `POST /v1/outcomes` saying how the task went.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import openai

from gateway.replay.traffic import read_traffic, sped_up

TRACE = Path("/work/shared/traces/azure-llm-2023-conv.csv")
MAX_OUTPUT_TOKENS = 64          # keeps the simulated models fast
MAX_PROMPT_TOKENS = 512
REPEAT_SHARE = 0.3              # share of chat calls asking a question already asked
STREAM_SHARE = 0.5
TENANT_WEIGHTS = {"acme": 5, "globex": 3, "initech": 2}
OUTCOME_WEIGHTS = {"success": 85, "failure": 8, "escalated": 7}
FAQ = tuple(f"Question {n}: how do I {verb} my {noun}?" for n, (verb, noun) in enumerate(
    (v, n) for v in ("reset", "export", "share", "delete", "rename", "upgrade") for n in ("account", "report", "plan")))
WORDS = ("the", "model", "request", "cost", "token", "route", "cache", "answer", "user", "data", "time", "plan",
         "report", "value", "system", "code", "review", "summary", "budget", "latency")


@dataclass(frozen=True)
class Arrival:
    """One request of the trace: when it came (seconds from the start, sped up) and its lengths."""

    offset_s: float
    context_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class Workflow:
    """A kind of task: the model alias of each step (an empty alias means embeddings)."""

    name: str
    weight: int
    steps: tuple[str, ...]
    min_steps: int = 1


WORKFLOWS = (
    Workflow("support-chat", 45, ("auto", "auto")),
    Workflow("summarize", 20, ("gpt-4o-mini",)),
    Workflow("code-review", 25, ("smart", "smart", "gpt-4o")),
    Workflow("rag-answer", 10, ("", "auto"), min_steps=2),
)


@dataclass(frozen=True)
class Step:
    alias: str
    prompt: str
    max_tokens: int
    stream: bool


@dataclass(frozen=True)
class TaskPlan:
    task_id: str
    tenant: str
    workflow: str
    steps: tuple[Step, ...]
    outcome: str


@dataclass
class Tally:
    """What the traffic did, as the client saw it."""

    calls: int = 0
    failed_calls: int = 0
    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)


def load_arrivals(path: Path, duration_s: float, speed: float) -> list[Arrival]:
    """The trace's first `duration_s * speed` seconds, replayed `speed` times faster."""
    return [Arrival(offset_s, request.input_tokens, request.output_tokens)
            for offset_s, request in sped_up(read_traffic(path, "azure"), duration_s, speed)]


def plan_task(rng: random.Random, arrival: Arrival) -> TaskPlan:
    """One task for one arrival: tenant, workflow, steps and the outcome it will report."""
    workflow = rng.choices(WORKFLOWS, [w.weight for w in WORKFLOWS])[0]
    count = rng.randint(workflow.min_steps, len(workflow.steps))
    steps = tuple(Step(alias=alias, prompt=_prompt(rng, arrival.context_tokens, repeat=bool(alias)),
                       max_tokens=max(1, min(arrival.generated_tokens, MAX_OUTPUT_TOKENS)),
                       stream=rng.random() < STREAM_SHARE)
                  for alias in workflow.steps[:count])
    return TaskPlan(task_id=f"task-{rng.getrandbits(64):016x}",
                    tenant=rng.choices(list(TENANT_WEIGHTS), list(TENANT_WEIGHTS.values()))[0],
                    workflow=workflow.name, steps=steps,
                    outcome=rng.choices(list(OUTCOME_WEIGHTS), list(OUTCOME_WEIGHTS.values()))[0])


def _prompt(rng: random.Random, context_tokens: int, *, repeat: bool) -> str:
    """A frequently asked question, or a fresh prompt about as long as the trace's (capped)."""
    if repeat and rng.random() < REPEAT_SHARE:
        return rng.choice(FAQ)
    words = min(context_tokens, MAX_PROMPT_TOKENS)
    return f"[{rng.getrandbits(48):012x}] " + " ".join(rng.choices(WORDS, k=words))


async def drive(gateway_url: str, keys: dict[str, str], arrivals: list[Arrival], *, seed: int = 7) -> Tally:
    """Send every arrival's task at its (sped-up) time; return what happened."""
    rng, tally = random.Random(seed), Tally()
    clients = {tenant: openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=key, max_retries=0, timeout=30)
               for tenant, key in keys.items()}
    loop = asyncio.get_running_loop()
    started_s = loop.time()
    try:
        async with asyncio.TaskGroup() as group:
            for arrival in arrivals:
                plan = plan_task(rng, arrival)
                await asyncio.sleep(max(0.0, started_s + arrival.offset_s - loop.time()))
                group.create_task(run_task(clients[plan.tenant], plan, tally))
    finally:
        for client in clients.values():
            await client.close()
    return tally


async def run_task(client: openai.AsyncOpenAI, plan: TaskPlan, tally: Tally) -> None:
    """Run a task's steps in order, then report its outcome (a failed call makes it a failure)."""
    headers = {"x-gateway-task-id": plan.task_id, "x-gateway-workflow": plan.workflow}
    outcome = plan.outcome
    for step in plan.steps:
        tally.calls += 1
        try:
            await call(client, step, headers)
        except openai.APIError as exc:
            tally.failed_calls += 1
            tally.errors[type(exc).__name__] += 1
            outcome = "failure"
            break
    try:
        await client.post("/outcomes", cast_to=object, body={"task_id": plan.task_id, "outcome": outcome})
        tally.outcomes[outcome] += 1
    except openai.APIError as exc:
        tally.errors[f"outcome {type(exc).__name__}"] += 1


async def call(client: openai.AsyncOpenAI, step: Step, headers: dict[str, str]) -> None:
    """One SDK call: embeddings, a chat completion, or a streamed one read to the end."""
    if not step.alias:
        await client.embeddings.create(model="text-embedding-3-small", input=step.prompt, extra_headers=headers)
        return
    messages = [{"role": "user", "content": step.prompt}]
    if not step.stream:
        await client.chat.completions.create(model=step.alias, messages=messages, max_tokens=step.max_tokens,
                                             temperature=0, extra_headers=headers)
        return
    stream = await client.chat.completions.create(
        model=step.alias, messages=messages, max_tokens=step.max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers=headers)
    async for _chunk in stream:
        pass
