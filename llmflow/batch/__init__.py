"""Batch inference: OpenAI batch JSONL in and out (``jsonl``), the concurrent client that sends
it (``client``), progress listeners (``progress``) and the run's figures and report (``report``)."""
