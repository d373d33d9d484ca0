"""Documented limits of the prompt language.

The reference (A1111 v1.10) has none of these; they keep hostile prompts from hanging the
parsers or filling memory, and sit far above anything a real prompt needs. Every parser
is linear in its input within them. Going past one raises a ``PromptSyntaxError`` (with
the position) or a ``PromptLimitError`` naming the limit.
"""

from __future__ import annotations

MAX_STEPS = 1000
"""Sampling steps a prompt is inspected or encoded for; the same bound as
``sdstack.generate.params.MAX_STEPS``."""

MAX_SCHEDULE_STEPS = 2 * MAX_STEPS
"""Steps one schedule may be resolved over: the second-order samplers (Heun, DPM2...)
resolve schedules over ``2 * steps``, as the reference does."""

MAX_SCHEDULE_TEXTS = 256
"""Different texts a prompt may resolve to, counted over all its AND parts: every AND
part, and every different text a ``[a:b:when]`` edit or ``[a|b]`` alternation gives it
at some step, is one text encoding. Counted before anything is expanded, from the
combinations of choices the constructs make (``[a|a]`` counts 2)."""

MAX_SCHEDULE_SIZE = 1_000_000
"""Characters all those texts may add up to, bounded before expanding: the number of
texts times the longest text the schedule can give (where every run of plain text,
bracket group and construct also counts 1). This also bounds a single prompt's length."""

MAX_EMPHASIS_DEPTH = 100
"""Emphasis brackets ``(`` and ``[`` open at the same time; one more is an error. Weights
are products over the open brackets, so this bounds the parser's work per fragment."""

MAX_WEIGHT = 1000.0
"""Largest magnitude of an emphasis weight (``(x:w)``, and the product a fragment gets
from nested brackets) and of an AND weight (``x :w``); the reference takes any float,
and an infinite or huge weight makes a black or NaN image."""
