"""Speed and memory benchmarks of our loop against TRL and TRL+Unsloth (never imported by dpo/)."""
