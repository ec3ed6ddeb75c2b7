"""The named prompt sets, in one registry: evaluation, the safety gate, the service and the benchmark grids all
accept exactly these names (and `NAME@N`, a seeded sample of N prompts of a named set).

    advbench-{train,dev,test,unseen}          harmful, AdvBench (SafeTuneBed split; unseen = in neither train nor dev)
    xstest-{dev,test,all}                     safe prompts that look unsafe (over-refusal), XSTest v2
    xstest-unsafe-{dev,test,all}              XSTest's unsafe contrast prompts
    harmbench-{standard,contextual,copyright} harmful, HarmBench text behaviours
    jbb-harmful                               harmful, JailbreakBench JBB-Behaviors
    orbench-{hard,toxic}-{dev,test,all}       OR-Bench-Hard-1K (safe) / OR-Bench-Toxic (unsafe)
    gptfuzz-questions                         GPTFuzz's 100 harmful questions (never evaluated: a judge may train on them)

The files come from the data folders (safekeel.data.home). Anything that is not a named set is a dataset file
whose last user turns are the prompts (`load`).
"""

from __future__ import annotations

from functools import partial

from safekeel.data import reference
from safekeel.data.formats import load_conversations
from safekeel.data.reference import PromptSet
from safekeel.registry import Registry

PROMPT_SETS: Registry[PromptSet] = Registry("prompt set")

for _split in ("train", "dev", "test"):
    PROMPT_SETS.register(f"advbench-{_split}")(partial(reference.advbench, _split))
PROMPT_SETS.register("advbench-unseen")(reference.advbench_unseen)
for _split in ("dev", "test", "all"):
    PROMPT_SETS.register(f"xstest-{_split}")(partial(reference.xstest_safe, _split))
    PROMPT_SETS.register(f"xstest-unsafe-{_split}")(partial(reference.xstest_unsafe, _split))
for _category in reference.HARMBENCH_CATEGORIES:
    PROMPT_SETS.register(f"harmbench-{_category}")(partial(reference.harmbench, _category))
PROMPT_SETS.register("jbb-harmful")(reference.jbb_harmful)
for _kind in reference.ORBENCH_KINDS:
    for _split in ("dev", "test", "all"):
        PROMPT_SETS.register(f"orbench-{_kind}-{_split}")(partial(reference.orbench, _kind, _split))
PROMPT_SETS.register("gptfuzz-questions")(reference.gptfuzz_questions)

NAMED_PREFIXES = ("advbench-", "xstest-", "harmbench-", "jbb-", "orbench-", "gptfuzz-")
"""A name with one of these prefixes means a named set (a typo is an error, never read as a file path)."""


def names() -> list[str]:
    """Every named set (without the @N samples)."""
    return PROMPT_SETS.names()


def has_named_prefix(name: str) -> bool:
    """Whether `name` claims to be a named set (anything else is a dataset path); it may still be unknown."""
    return name.startswith(NAMED_PREFIXES)


def split_sample(name: str) -> tuple[str, int | None]:
    """('advbench-test', 100) for 'advbench-test@100'; (name, None) without '@'. ValueError for a bad size."""
    if "@" not in name:
        return name, None
    base, _, size = name.rpartition("@")
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"prompt set {name!r}: the sample size after '@' must be a positive integer")
    return base, int(size)


def is_known(name: str) -> bool:
    """Whether `name` is a named set or a sample `NAME@N` of one (N a positive integer)."""
    try:
        base, _ = split_sample(name)
    except ValueError:
        return False
    return base in PROMPT_SETS.names()


def _unknown(name: str, base: str) -> str:
    if base.startswith("harmbench-"):
        known = ", ".join(reference.HARMBENCH_CATEGORIES)
        return f"unknown HarmBench functional category {base.split('-', 1)[1]!r}; known: {known} (prompt set {name!r})"
    family = [n for n in names() if n.split("-")[0] == base.split("-")[0]]
    return (f"unknown prompt set {name!r}; known: {', '.join(family or names())} (or NAME@N, a seeded sample of N "
            "prompts of a named set)")


def get(name: str) -> PromptSet:
    """A named set, or `NAME@N`: a seeded sample of N of its prompts (all of them, in a seeded order, when N
    is at least the set's size), named '<set name>@N'. ValueError for an unknown name."""
    base, size = split_sample(name)
    if base not in PROMPT_SETS.names():
        raise ValueError(_unknown(name, base))
    found = PROMPT_SETS.get(base)
    return found if size is None else reference.sample_prompts(found, size)


def load(name: str) -> PromptSet:
    """A named set (see `get`), or a dataset file whose last user turns are the prompts."""
    if has_named_prefix(name):
        return get(name)
    loaded = load_conversations(name, strict=True, require_assistant=False)
    return PromptSet(name, [c.last_user for c in loaded.conversations],
                     [f"{name}:{i}" for i in range(len(loaded.conversations))])
