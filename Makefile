# The two commands of the README. Each sets up .venv by itself (env/setup.sh).
.PHONY: demo test setup clean

setup:
	bash env/setup.sh

# The main job on this machine (the local executor; no SLURM needed): the bundled
# SpeechGradebook sample converted, validated, a tiny model built and LoRA-trained,
# evaluated as 2 shards, and reported (runs/<run-id>/report.html).
demo: setup
	.venv/bin/slurmtune run manifests/quickstart.yaml

test: setup
	.venv/bin/python -m pytest

clean:
	rm -rf .venv runs .cache .pytest_cache .hypothesis
