"""The math task: real reasoning-gym problems, a seeded split, math-verify rewards."""

from ops.config import load_config
from policy.tasks import build_task
from policy.tasks.math import final_answer


def task(**kw):
    return build_task(load_config(environ={}, task={"train_size": 40, "eval_size": 10, **kw}).task)


def test_split_is_seeded_and_disjoint():
    a, b = task(), task()
    assert [p.question for p in a.train] == [p.question for p in b.train]
    assert len(a.train) == 40 and len(a.held_out) == 10
    assert not {p.prompt_id for p in a.train} & {p.prompt_id for p in a.held_out}
    assert [p.question for p in task(seed=1).train] != [p.question for p in a.train]


def test_prompt_is_a_one_shot_chat_ending_with_the_question():
    problem = task().train[0]
    roles = [m["role"] for m in problem.messages]
    assert roles == ["user", "assistant", "user"]
    assert problem.messages[-1]["content"].startswith(problem.question)
    assert "<answer>" in problem.messages[1]["content"]


def test_rewards_check_the_final_answer_with_math_verify():
    t = task(format_bonus=0.1)
    problem = t.train[0]
    right, wrong = problem.answer, str(int(float(problem.answer)) + 1)
    assert t.reward(problem, f"work...\n<answer>{right}</answer>") == 1.1
    assert t.reward(problem, f"so the result is {right}") == 1.0  # correct without the tag
    assert t.reward(problem, f"<answer>{wrong}</answer>") == 0.1  # the tag alone earns the bonus
    assert t.reward(problem, "I do not know") == 0.0
    assert final_answer("1 + 1 = 2, <answer> 2 </answer>") == ("2", True)
