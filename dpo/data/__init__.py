"""Preference data: reading rows from files, folders and hubs (`sources`), implicit prompts (`prompts`),
tokenizing DPO pairs and collating them (`pairs`), the rows of the objectives beyond DPO
(`objective_rows`), the data report (`report`), the built-in tasks (`tasks`), and `python -m dpo.data`
(`cli`)."""
