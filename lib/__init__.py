"""slurmtune: LoRA/QLoRA fine-tuning of language models on course data, as SLURM batch jobs.

The data flows one way, one module per step::

    convert (converters/) -> validate (validate.py) -> split (split.py)
        -> train -> eval array -> report            (jobs/, one file per job kind)

Run manifests (config.py) describe a run; the CLI (cli.py) is the way in.
"""

__version__ = "0.1.0"
