"""nbval collects the series itself; the practice copies (no outputs, no solutions) are
generated from it and checked by tests/test_course.py instead of being executed twice."""

collect_ignore_glob = ["practice/*"]
