"""Coverage-guided fuzzing (atheris/libFuzzer) of the request pipeline; see fuzz_head_router.py."""
