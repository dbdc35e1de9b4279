"""The one error type for anything a user got wrong: a setting, a flag, a file, a request.

Every message has the same three parts, so a user always learns what to change:

    yarn config: `factor` is 0.5. Fix: give a finite number >= 1, e.g. 4.0 to extend 4x

`source` says where the value came from ("yarn config", "serve", a sweep file's
path, "yarn_factor" of a request), `field` names it, `problem` says what is
wrong with it and `fix` what to do. The CLI's `main()` catches it once and
prints the line with exit status 2; vLLM's OpenAI server turns it (a
ValueError) into a 400 response.
"""

from __future__ import annotations


class UserError(ValueError):
    """A user-supplied value is wrong; `str(e)` is one line naming the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str, *, source: str = "yarn config"):
        self.field = field
        self.problem = problem
        self.fix = fix
        self.source = source
        super().__init__(f"{source}: `{field}` {problem}. Fix: {fix}")

    def __reduce__(self):  # picklable across vLLM's and Ray's process boundaries
        return (_rebuild, (self.field, self.problem, self.fix, self.source))


def _rebuild(field: str, problem: str, fix: str, source: str) -> UserError:
    return UserError(field, problem, fix, source=source)
