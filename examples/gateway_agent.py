"""An agent that trains the policy it talks to: ask through the OpenAI-compatible gateway, check each answer
with a verifier, post the rewards back. No searcher runs; this loop is the job's only generator.

    TBA_GATEWAY_TOKEN=secret python examples/gateway_agent.py --url http://127.0.0.1:8000/v1 --rounds 100

The task here: "say some digits", rewarded by the share of digits in the answer, which any model (even
a tiny random one) learns in a few dozen steps (the job's `task.name: toy` holds out the same questions).
Swap `ask` and `verify` for your own task and checker.
"""

from __future__ import annotations

import argparse
import os
import random

from openai import OpenAI


def ask(rng: random.Random) -> str:
    return f"Say some digits ({rng.randrange(1000)})."


def verify(question: str, answer: str) -> float:
    text = answer.strip()
    return sum(c.isdigit() for c in text) / len(text) if text else 0.0


def agent_round(client: OpenAI, model: str, rng: random.Random, n: int = 6, max_tokens: int = 6) -> dict:
    """One question, n answers (one group), each verified; the rewards go back to train the policy."""
    question = ask(rng)
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], n=n, max_tokens=max_tokens, temperature=1.0
    )
    rewards = [verify(question, choice.message.content or "") for choice in response.choices]
    ack = client.post("/rewards", body={"id": response.id, "rewards": rewards}, cast_to=object)
    return {"rewards": rewards, "policy_version": ack["policy_version"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key=os.environ.get("TBA_GATEWAY_TOKEN", "none"))
    model = client.models.list().data[0].id
    rng = random.Random(args.seed)
    for i in range(args.rounds):
        done = agent_round(client, model, rng)
        mean = sum(done["rewards"]) / len(done["rewards"])
        print(f"round {i}: mean reward {mean:.2f} at policy version {done['policy_version']}", flush=True)


if __name__ == "__main__":
    main()
