"""Fine-tuning as a service: OpenAI's files and fine-tuning jobs on `tuneforge serve`, co-served.

    files.py     uploaded training files: chat-format JSONL checked line by line on arrival
    jobs.py      job records, their events, the queue and the worker that trains one job at a time
    coserve.py   the policy that interleaves a job's optimizer steps with the engine's decoding steps
    routes.py    the HTTP routes (/v1/files, /v1/fine_tuning/jobs...) over the three above

Jobs train with `tuneforge.train.train` on the model the engine serves (one copy of the base
weights), holding the engine's step lock for each optimizer step.
"""
