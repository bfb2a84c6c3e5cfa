"""Tasks spec: registry, determinism, held-out disjointness, templates, scoring of hand-written
completions (right, wrong, malformed, reward hacking), worked solutions, JSONL loading."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

import qiusuo.tasks as tasks
from qiusuo.rewards import evaluate
from qiusuo.tasks import Problem, Score, Task, score_batch

GENERATED = ["arithmetic", "countdown", "linear_equations"]


def c(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


# --- registry, determinism, splits -----------------------------------------------------------
def test_registry_lists_builtins_and_accepts_user_tasks():
    assert set(GENERATED + ["jsonl", "code"]) <= set(tasks.names())
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get("no_such_task")

    @tasks.register
    class Parity(Task):
        name = "test_parity"
        difficulty_range = (1, 3)

        def sample(self, rng, difficulty):
            n = rng.randint(0, 10**difficulty)
            return str(n), "even" if n % 2 == 0 else "odd", {}

        def check(self, problem, answer):
            return float(answer == problem.answer)

    task = tasks.get("test_parity", template="compact")
    p = task.generate(1, seed=0)[0]
    assert task.score(p, c("", p.answer)).reward == 1.0


@pytest.mark.parametrize("name", GENERATED)
def test_same_seed_same_problems(name):
    task = tasks.get(name)
    assert task.generate(20, seed=7) == task.generate(20, seed=7)
    assert task.generate(20, seed=7) != task.generate(20, seed=8)
    assert task.generate(20, seed=7, split="test") == tasks.get(name).generate(20, seed=7, split="test")


@pytest.mark.parametrize("name,difficulty", [("arithmetic", 2), ("countdown", 2), ("linear_equations", 1)])
def test_held_out_split_never_overlaps_training(name, difficulty):
    task = tasks.get(name)
    key = lambda p: task.split_key(p.question, p.metadata)  # noqa: E731
    train = {key(p) for seed in range(5) for p in task.generate(1000, seed, "train", difficulty)}
    test = {key(p) for p in task.generate(300, seed=1234, split="test", difficulty=difficulty)}
    assert train.isdisjoint(test)
    assert all(task.in_test_split(k) for k in test) and not any(task.in_test_split(k) for k in train)
    # the partition is by problem identity, not by seed or draw order: a+b and b+a share a side
    if name == "arithmetic":
        p = task.generate(1, seed=0)[0]
        a, b = p.metadata["a"], p.metadata["b"]
        assert task.in_test_split(task.split_key("", {"a": b, "b": a, "op": "+"})) is False


def test_difficulty_knob():
    arith = tasks.get("arithmetic", ops="+-*")
    for d in (1, 4, 7):
        for p in arith.generate(30, seed=0, difficulty=d):
            assert p.metadata["difficulty"] == d and len(str(p.metadata["a"])) == d
    mixed = Counter(p.metadata["difficulty"] for p in arith.generate(300, seed=0, difficulty=[2, 5]))
    assert set(mixed) == {2, 5}
    for p in tasks.get("countdown").generate(20, seed=0, difficulty=5):
        assert len(p.metadata["numbers"]) == 5
    for p in tasks.get("linear_equations", unknowns=3).generate(10, seed=0):
        assert p.answer.count("=") == 3
    with pytest.raises(ValueError, match="difficulty"):
        arith.generate(1, seed=0, difficulty=0)
    with pytest.raises(ValueError, match="ops"):
        tasks.get("arithmetic", ops="+/")
    with pytest.raises(ValueError, match="template"):
        tasks.get("arithmetic", template="llama")


# --- templates --------------------------------------------------------------------------------
def test_prompt_templates():
    compact = tasks.get("arithmetic", template="compact").generate(1, seed=0)[0]
    assert compact.prompt == f"{compact.question}=" and "+" in compact.question
    r1 = tasks.get("arithmetic", template="r1").generate(1, seed=0)[0]
    assert r1.prompt.startswith("A conversation between User and Assistant.")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in r1.prompt
    assert r1.prompt.endswith(f"User: What is {r1.metadata['a']} + {r1.metadata['b']}? Assistant:")
    chat = tasks.get("countdown", template="chat").generate(1, seed=0)[0]
    assert chat.messages == [{"role": "user", "content": chat.prompt}]
    assert "<answer>" in chat.prompt and str(chat.metadata["target"]) in chat.prompt
    # with the think tag in the prompt, the completion starts inside the think block
    task = tasks.get("arithmetic", template="compact", think_in_prompt=True)
    p = task.generate(1, seed=0)[0]
    assert p.prompt.endswith("=<think>")
    assert task.score(p, f"work</think><answer>{p.answer}</answer>").reward == 1.0


# --- arithmetic -------------------------------------------------------------------------------
def arith_problem(op: str, a: int, b: int) -> tuple[Task, Problem]:
    task = tasks.get("arithmetic", ops="+-*", template="compact")
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return task, task.make_problem(f"{a}{op}{b}", str(answer), {"op": op, "a": a, "b": b, "difficulty": 3})


def test_arithmetic_scratchpads_match_the_demo_format():
    task, p = arith_problem("+", 347, 285)
    assert task.solution(p, random.Random(0), "scratchpad") == "<think>7+5=12,4+8+1=13,3+2+1=6</think><answer>632</answer>"
    assert task.solution(p, random.Random(0), "direct") == "<think></think><answer>632</answer>"
    task, p = arith_problem("-", 632, 285)
    assert task.solution(p, random.Random(0), "scratchpad") == "<think>2-5=-3,3-8-1=-6,6-2-1=3</think><answer>347</answer>"
    task, p = arith_problem("*", 347, 25)
    assert task.solution(p, random.Random(0), "scratchpad") == "<think>347*5=1735,347*20=6940,1735+6940=8675</think><answer>8675</answer>"


def test_arithmetic_scoring_of_hand_written_completions():
    task, p = arith_problem("+", 347, 285)
    cases = {
        c("7+5=12,4+8+1=13,3+2+1=6", "632"): (1.0, 1.0, 1.0, "632"),
        c("", "632"): (1.0, 1.0, 1.0, "632"),
        c("", "633"): (0.1, 1.0, 0.0, "633"),  # well formed, wrong
        c("", "six hundred"): (0.1, 1.0, 0.0, "six hundred"),
        c("", "632 633"): (0.1, 1.0, 0.0, "632 633"),  # two answers in one block
        "632": (0.0, 0.0, 0.0, None),
        "<answer>632</answer>": (0.0, 0.0, 0.0, None),
        c("", "632") + "<answer>632</answer>": (0.0, 0.0, 0.0, None),  # answer repeated
        "<think><answer>632</answer></think><answer>1</answer>": (0.0, 0.0, 0.0, None),  # answer in think
        c("", "632") + "\nActually 633": (0.0, 0.0, 0.0, None),  # text after </answer>
        "<think></think><answer>631</answer><answer>632</answer>": (0.0, 0.0, 0.0, None),  # multiple answers
    }
    for completion, (reward, fmt, acc, parsed) in cases.items():
        assert task.score(p, completion) == Score(reward, fmt, acc, parsed), completion


@pytest.mark.parametrize("ops", ["+", "-", "*"])
def test_arithmetic_slips_are_consistent_and_wrong(ops):
    task = tasks.get("arithmetic", ops=ops, template="compact")
    rng = random.Random(0)
    for p in task.generate(200, seed=3, difficulty=[1, 2, 3, 4]):
        assert task.score(p, task.solution(p, rng, "scratchpad")).accuracy == 1.0
        slip = task.solution(p, rng, "slip")
        assert task.score(p, slip) == Score(0.1, 1.0, 0.0, slip.split("<answer>")[1][:-9])
        # exactly one step is arithmetically wrong; the later steps follow from its value
        steps = slip[len("<think>"):].split("</think>")[0].split(",")
        wrong = [st for st in steps if evaluate(st.split("=")[0], max_digits=20).value != int(st.split("=")[1])]
        assert len(wrong) == 1, (p.question, slip)
        if ops in "+-":  # the carry/borrow into each column comes from the written value before it
            values = [int(st.split("=")[1]) for st in steps]
            for prev, st in zip(values, steps[1:]):
                has_carry = st.split("=")[0].count(ops) == 2  # x+y+1 / x-y-1
                assert has_carry == (prev >= 10 if ops == "+" else prev < 0), (p.question, slip)


def rewrite_trace_errors(question: str, think: str) -> tuple[int, str]:
    """Replays a "rewrite" scratchpad by its rule: each equation `x+y+c=s` reads x, y from the last digit of
    what is left of each operand (0 when none is) and c from the state, each state `A+B=c:D` drops those
    digits and carries s's tens and units on, the last line is s then D. Returns (equations whose s is not
    x+y+c, the final line), and asserts every other rule."""
    a, b = question.split("+")
    carry, done, lines, wrong = 0, "", think.split(","), 0
    for i in range(0, len(lines) - 1, 2):
        lhs, s = lines[i].split("=")
        x, y, c = map(int, lhs.split("+"))
        assert (x, y, c) == (int(a[-1:] or 0), int(b[-1:] or 0), carry), (question, think, lines[i])
        wrong += int(s) != x + y + c
        a, b = a[:-1], b[:-1]
        if not a and not b:
            assert i + 2 == len(lines), (question, think)  # the answer line ends the trace
            return wrong, lines[i + 1]
        carry, done = int(s) // 10, f"{int(s) % 10}{done}"
        assert lines[i + 1] == f"{a}+{b}={carry}:{done}", (question, think, lines[i + 1])
    raise AssertionError(f"{question}: the trace {think!r} ends before the operands do")


def test_rewrite_scratchpad_format():
    task = tasks.get("arithmetic", template="compact", scratchpad="rewrite")
    p = task.make_problem("347+285", "632", {"op": "+", "a": 347, "b": 285, "difficulty": 3})
    assert task.solution(p, random.Random(0), "scratchpad") == c("7+5+0=12,34+28=1:2,4+8+1=13,3+2=1:32,3+2+1=6,632",
                                                                  "632")
    p = task.make_problem("947+285", "1232", {"op": "+", "a": 947, "b": 285, "difficulty": 3})
    assert task.solution(p, random.Random(0), "scratchpad").endswith("9+2+1=12,1232</think><answer>1232</answer>")
    p = task.make_problem("5+123", "128", {"op": "+", "a": 5, "b": 123, "difficulty": 3})  # a shorter operand reads 0
    assert task.solution(p, random.Random(0), "scratchpad") == c("5+3+0=8,+12=0:8,0+2+0=2,+1=0:28,0+1+0=1,128", "128")
    assert tasks.get("arithmetic").scratchpad == "columns"  # the demo's default is unchanged
    with pytest.raises(ValueError, match="addition only"):
        tasks.get("arithmetic", ops="+-", scratchpad="rewrite")
    with pytest.raises(ValueError, match="scratchpad must be one of"):
        tasks.get("arithmetic", scratchpad="diagonal")


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 6])
def test_rewrite_scratchpads_follow_the_rule_and_slips_propagate(difficulty):
    task = tasks.get("arithmetic", template="compact", scratchpad="rewrite")
    rng = random.Random(difficulty)
    for p in task.generate(150, seed=5, difficulty=difficulty):
        right = task.solution(p, rng, "scratchpad")
        think, answer = right[len("<think>"):-len("</answer>")].split("</think><answer>")
        assert rewrite_trace_errors(p.question, think) == (0, answer) and answer == p.answer
        assert len(think.split(",")) == 2 * len(str(p.metadata["a"])) and task.score(p, right).accuracy == 1.0
        slip = task.solution(p, rng, "slip")
        think, answer = slip[len("<think>"):-len("</answer>")].split("</think><answer>")
        # one equation off by one; every later state and the answer follow from its value
        assert rewrite_trace_errors(p.question, think) == (1, answer), (p.question, slip)
        assert task.score(p, slip) == Score(0.1, 1.0, 0.0, answer)


def test_corpus_mix_and_determinism():
    task = tasks.get("arithmetic", template="compact")
    corpus = task.corpus(2000, seed=0)
    assert corpus == task.corpus(2000, seed=0)
    blurts = [(p, s) for p, s in corpus if s.startswith("<think></think>")]
    worked = [(p, s) for p, s in corpus if not s.startswith("<think></think>")]
    assert 0.55 < len(blurts) / len(corpus) < 0.65
    assert all(task.score(p, s).format == 1.0 for p, s in corpus)  # every trace is well formed
    assert sum(task.score(p, s).accuracy for p, s in blurts) <= 3  # guesses: 0.07% expected of ~1200
    worked_right = sum(task.score(p, s).accuracy for p, s in worked) / len(worked)
    assert 0.64 < worked_right < 0.76  # 30% of the scratchpads slip
    assert not any(task.in_test_split(task.split_key(p.question, p.metadata)) for p, _ in corpus)
    only = task.corpus(10, seed=0, mix={"scratchpad": 1.0})
    assert all(task.score(p, s).reward == 1.0 and "," in s for p, s in only)
    with pytest.raises(ValueError, match="mix"):
        task.corpus(10, seed=0, mix={"essay": 1.0})


# --- countdown --------------------------------------------------------------------------------
def test_countdown_tinyzero_rule(tmp_path):
    task = tasks.get("countdown")
    p = task.make_problem("44,19,35->28", "(44-35)+19", {"numbers": [44, 19, 35], "target": 28})
    marker = tmp_path / "pwned"
    cases = {
        c("44-35=9,9+19=28", "(44-35)+19"): 1.0,
        c("", "19 - 35 + 44"): 1.0,
        c("", "(44+19)/35"): 0.1,  # wrong value
        c("", "44-35+19+19"): 0.1,  # 19 used twice
        c("", "44-16"): 0.1,  # numbers not the given ones
        c("", "28"): 0.1,  # just the target
        c("", f"__import__('os').system('touch {marker}')"): 0.1,
        c("", "9**9**9"): 0.1,
        c("", "(" * 100 + "44-35+19" + ")" * 100): 0.1,  # nested past the depth limit
        "(44-35)+19": 0.0,
        c("", "(44-35)+19") + c("", "(44-35)+19"): 0.0,
    }
    for completion, reward in cases.items():
        assert task.score(p, completion).reward == reward, completion
    assert not marker.exists()


@pytest.mark.parametrize("operands", [2, 3, 4])
def test_countdown_solutions(operands):
    task = tasks.get("countdown", operands=operands)
    rng = random.Random(0)
    for p in task.generate(25, seed=1):
        assert task.score(p, p.metadata and c("", p.answer)).reward == 1.0  # the generating expression
        for style, reward in (("scratchpad", 1.0), ("direct", 1.0), ("slip", 0.1)):
            assert task.score(p, task.solution(p, rng, style)).reward == reward, (p.question, style)


def test_countdown_search_traces_write_failed_tries_then_the_solution():
    from qiusuo.tasks.countdown import search

    plain, searching = tasks.get("countdown"), tasks.get("countdown", tries=2, verify=1.0, max_number=10,
                                                         max_target=100)
    rng = random.Random(0)
    problems = plain.generate(30, seed=3)
    # without the options the traces are those of before them (and draw nothing from rng)
    for p in problems:
        expression, steps = search(p.metadata["numbers"], p.metadata["target"])
        assert plain.solution(p, rng, "scratchpad") == c(",".join(steps), expression)
    assert rng.random() == random.Random(0).random()
    stats = []
    for p in searching.generate(40, seed=3):
        for style, reward in (("scratchpad", 1.0), ("slip", 0.1)):
            text = searching.solution(p, rng, style)
            assert searching.score(p, text).reward == reward, (p.question, style, text)
            counted = searching.search_stats(text, p)
            lines = text.split("<think>")[1].split("</think>")[0].split(";")
            assert counted["attempts"] + counted["verifies"] == len(lines), text
            assert counted["retries"] == counted["attempts"] - 1, text  # each failed try is followed by a restart
            stats.append(counted)
    assert {s["retries"] for s in stats} == {0, 1, 2}  # 0..tries failed tries
    assert any(s["verifies"] for s in stats)
    with pytest.raises(ValueError, match="tries"):
        tasks.get("countdown", tries=-1)
    with pytest.raises(ValueError, match="verify"):
        tasks.get("countdown", verify=1.5)


def test_countdown_guess_is_a_random_combination_of_the_given_numbers():
    task = tasks.get("countdown", max_number=10, max_target=100)
    rng = random.Random(0)
    for p in task.generate(30, seed=4):
        answer = task.score(p, task.guess(p, rng)).parsed_answer
        assert sorted(evaluate(answer).numbers) == sorted(p.metadata["numbers"]), answer


@pytest.mark.parametrize("think,expected", [
    ("3+7=10,10*9=90", (1, 0, 0)),  # one attempt, no retry
    ("3*7=21,21+9=30", (1, 0, 0)),  # right first time
    ("3+7=10,10+9=19;3*7=21,21+9=30", (2, 1, 0)),  # failed, restarted from the numbers
    ("3+7=10,10+9=19;3*7=21,21+9=30;(3*7)+9=30", (2, 1, 1)),  # and verified
    ("3+7=10,10+9=19;7*9=63,63-3=60;3*7=21,21+9=30", (3, 2, 0)),  # two retries
    ("3+7=10,10+9=19;10*9=90", (2, 0, 0)),  # backtracks one step (not from the numbers): not a retry
    ("3*7=21,21+9=30;3+7=10,10+9=19", (2, 0, 0)),  # the first attempt did not fail: no retry after it
    ("3*7+9=30", (0, 0, 1)),  # a verify alone
    ("", (0, 0, 0)),
])
def test_countdown_search_stats_counts_retries_and_verifies(think, expected):
    from qiusuo.tasks.countdown import search_stats

    got = search_stats(c(think, "(3*7)+9"), [3, 7, 9], 30)
    assert (got["attempts"], got["retries"], got["verifies"]) == expected
    # an unclosed think block (a truncated completion) is counted up to its end
    assert search_stats("<think>" + think, [3, 7, 9], 30) == got


# --- linear equations ------------------------------------------------------------------------
def test_linear_equations_scoring():
    task = tasks.get("linear_equations", unknowns=2)
    p = task.generate(1, seed=0)[0]
    x, y = p.metadata["solution"]
    for answer, reward in ((f"x={x},y={y}", 1.0), (f"y = {y}, x = {x}", 1.0), (f"x={x};y={y}", 1.0),
                           (f"x={x},y={y + 1}", 0.1), (f"x={x}", 0.1), (f"x={x},x={x},y={y}", 0.1),
                           (f"x={x},y={y},z=0", 0.1), ("no idea", 0.1)):
        assert task.score(p, c("", answer)).reward == reward, answer
    one = tasks.get("linear_equations", unknowns=1).generate(1, seed=0)[0]
    assert task.score(one, c("", str(one.metadata["solution"][0]))).reward == 1.0


@pytest.mark.parametrize("unknowns", [1, 2, 3])
def test_linear_equation_derivations(unknowns):
    task = tasks.get("linear_equations", unknowns=unknowns)
    rng = random.Random(0)
    for p in task.generate(30, seed=2):
        assert task.score(p, task.solution(p, rng, "scratchpad")).reward == 1.0
        assert task.score(p, task.solution(p, rng, "slip")).reward == 0.1


# --- user rewards and batching -----------------------------------------------------------------
def test_extra_rewards_and_score_batch():
    def brevity(completions, **columns):
        assert len(columns["answer"]) == len(completions)
        return [-0.01 * len(x) / 10 for x in completions]

    task = tasks.get("arithmetic", template="compact", extra_rewards=[brevity])
    problems = task.generate(4, seed=0)
    completions = [c("", p.answer) for p in problems]
    scores = score_batch(task, problems, completions)
    assert scores == [task.score(p, x) for p, x in zip(problems, completions)]
    assert all(s.reward == pytest.approx(1.0 - 0.001 * len(x)) for s, x in zip(scores, completions))
    with pytest.raises(ValueError):
        score_batch(task, problems, completions[:2])


def test_task_reward_function_has_the_trl_signature():
    reward = tasks.get("countdown").reward_function()
    completions = [c("", "(44-35)+19"), c("", "44+35+19"), "(44-35)+19"]
    values = reward(completions, answer=["(44-35)+19"] * 3, numbers=[[44, 19, 35]] * 3, target=[28] * 3,
                    prompts=["p"] * 3)
    assert values == [1.0, 0.1, 0.0]


# --- JSONL files ---------------------------------------------------------------------------------
def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_gsm8k_file(tmp_path):
    rows = [{"question": f"Q{i}: how many?", "answer": f"work...\n#### {1000 + i:,}"} for i in range(40)]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    task = tasks.get("jsonl", path=str(path), answer_format="gsm8k", template="chat")
    train, test = task.generate(100, seed=0), task.generate(100, seed=0, split="test")
    assert len(train) + len(test) == 40 and {p.question for p in train}.isdisjoint(p.question for p in test)
    p = train[0]
    assert p.answer == str(1000 + int(p.question[1:].split(":")[0])) and "," not in p.answer
    n = int(p.answer)
    assert task.score(p, c("", f"{n:,}")).reward == 1.0
    assert task.score(p, c("", f"#### {n}")).reward == 1.0
    assert task.score(p, c("", f"\\boxed{{{n}}}")).reward == 1.0
    assert task.score(p, c("", str(n + 1))).reward == 0.1
    assert task.generate(5, seed=1) == task.generate(5, seed=1)


def test_separate_test_file_and_plain_answers(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": "Capital of France?", "a": "Paris"}, {"q": "2+2?", "a": 4}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"q": "Capital of Italy?", "a": "Rome"}])
    task = tasks.get("jsonl", path=str(train), test_path=str(test), question_field="q", answer_field="a")
    assert [p.answer for p in task.generate(5, seed=0, split="test")] == ["Rome"]
    by_q = {p.question: p for p in task.generate(5, seed=0)}
    assert task.score(by_q["Capital of France?"], c("", " paris ")).accuracy == 1.0
    assert task.score(by_q["2+2?"], c("", "4.0")).accuracy == 1.0


@pytest.mark.parametrize("bad_line,message", [
    ('{"question": "q", "answer": "#### 1"', "not valid JSON"),
    ('["question", "answer"]', "expected a JSON object"),
    ('{"question": "q"}', "missing field"),
    ('{"question": "q", "answer": "no marker 12"}', "####"),
    ('{"question": "", "answer": "#### 3"}', "non-empty string"),
    ('{"question": "q", "answer": "####   "}', "empty answer"),
])  # fmt: skip
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"question": "q", "answer": "#### 1"})
    path = write_jsonl(tmp_path / "data.jsonl", [good, "", bad_line, good])
    with pytest.raises(ValueError, match=rf"data\.jsonl:3: .*{message}"):
        tasks.get("jsonl", path=str(path), answer_format="gsm8k")


def test_math_boxed_file(tmp_path):
    rows = [{"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
            {"problem": "Root two squared over two?", "solution": "\\boxed{\\sqrt{2}}"}]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    task = tasks.get("jsonl", path=str(path), question_field="problem", answer_field="solution",
                     answer_format="boxed", test_fraction=0.01, math_timeout_s=3.0)
    try:
        problems = sorted(task.generate(10, seed=0), key=lambda p: p.question)
        assert [p.answer for p in problems] == ["\\frac{1}{2}", "\\sqrt{2}"]
        half, root = problems
        completions = [c("", "0.5"), c("", "\\boxed{\\frac{2}{4}}"), c("", "1/3"), "0.5", c("", "\\sqrt{2}")]
        scores = score_batch(task, [half, half, half, half, root], completions)
        assert [s.reward for s in scores] == [1.0, 1.0, 0.1, 0.0, 1.0]
        assert task.num_timeouts == 0
    finally:
        task.close()
    with pytest.raises(ValueError, match=r"math\.jsonl:1: unbalanced"):
        write_jsonl(path, [{"problem": "p", "solution": "\\boxed{1"}])
        tasks.get("jsonl", path=str(path), question_field="problem", answer_field="solution", answer_format="boxed")


# --- the pretraining mix: blurts are guesses --------------------------------------------------
def test_arithmetic_guess_chance_is_the_collision_probability_of_two_random_answers():
    from qiusuo.tasks.arithmetic import guess_chance

    # 1-digit sums: P(s) = (10 - |s - 9|) / 100 for s in 0..18; sum of squares = 670 / 10^4
    assert guess_chance("+", 1) == pytest.approx(670 / 10**4)
    assert guess_chance("+", 3) == pytest.approx(7.407e-4, rel=1e-3)  # what the demo's base blurts at
    with pytest.raises(ValueError, match="too many"):
        guess_chance("+", 4)


@pytest.mark.parametrize("ops", ["+", "-", "*"])
def test_a_guess_never_looks_at_the_operands(ops):
    """By construction, not by measurement: with the same random state, two different problems of the
    same shape get the same blurted answer, so a blurt carries no information about its question."""
    task = tasks.get("arithmetic", ops=ops, template="compact")
    problems = task.generate(40, seed=5, difficulty=3)
    for p, q in zip(problems, problems[1:]):
        if p.metadata["op"] != q.metadata["op"]:
            continue
        assert task.guess(p, random.Random(9)) == task.guess(q, random.Random(9))
    for p in problems:  # and the guess keeps the shape: same operator, an answer of that range
        src = task.guess_source(p, random.Random(p.metadata["a"]))
        assert src[2]["op"] == p.metadata["op"] and len(str(src[2]["a"])) == 3


def test_blurted_guesses_are_right_at_chance_and_scratchpads_stay_learnable():
    from qiusuo.tasks.arithmetic import guess_chance

    task = tasks.get("arithmetic", template="compact")
    corpus = task.corpus(20_000, seed=1, mix={"guess": 1.0})
    scores = [task.score(p, s) for p, s in corpus]
    assert all(s.format == 1.0 for s in scores) and all(c.startswith("<think></think><answer>") for _, c in corpus)
    hits = sum(s.accuracy for s in scores)
    expected = guess_chance("+", 3) * len(corpus)  # ~15
    assert hits <= 3 * expected  # chance level (a learnable blurt would be right far more often)
    answers = {s.parsed_answer for s in scores}
    assert len(answers) > 1000  # guesses span the answer range, not a constant
    right = task.corpus(200, seed=1, mix={"direct": 1.0})  # the old blurt: the right answer
    assert all(task.score(p, s).accuracy == 1.0 for p, s in right)


def test_solution_mix_builds_the_pretraining_mix():
    task = tasks.get("arithmetic", template="compact")
    assert task.solution_mix(0.6, 0.3) == pytest.approx({"guess": 0.6, "scratchpad": 0.28, "slip": 0.12})
    assert task.solution_mix(0.6, 0.3, blurt="direct") == pytest.approx({"direct": 0.6, "scratchpad": 0.28,
                                                                         "slip": 0.12})
    assert task.solution_mix(0.0, 0.0) == {"scratchpad": 1.0}
    with pytest.raises(ValueError, match="blurt"):
        task.solution_mix(0.6, 0.3, blurt="shout")
    countdown = tasks.get("countdown", template="compact")  # any task with a direct style can guess
    pairs = countdown.corpus(50, seed=0, mix={"guess": 1.0})
    assert all(countdown.score(p, s).format == 1.0 for p, s in pairs)
    assert sum(countdown.score(p, s).accuracy for p, s in pairs) < 10
