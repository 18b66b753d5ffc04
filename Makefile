# The two set-up-free commands (each creates .venv with a CPU torch on first use):
#   make demo   run `kvcomp demo`: SmolLM2-135M answers a needle question densely and with kvcomp
#   make test   run the whole test suite (what CI runs)
.PHONY: demo test lint

demo:
	bash tools/venv.sh
	.venv/bin/kvcomp demo

test:
	bash tools/venv.sh
	.venv/bin/python -m pytest -q tests $(PYTEST_ARGS)

lint:
	bash tools/venv.sh
	.venv/bin/ruff check packages tests tools
