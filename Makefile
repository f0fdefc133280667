# The two commands of the README. Each sets up .venv by itself (env/setup.sh).
.PHONY: demo test setup clean

setup:
	bash env/setup.sh

# The main job on the embedded default (no SLURM needed): the bundled SpeechGradebook
# sample converted, validated and split, end to end.
demo: setup
	bash env/demo.sh

test: setup
	.venv/bin/python -m pytest

clean:
	rm -rf .venv out runs .cache .pytest_cache .hypothesis
