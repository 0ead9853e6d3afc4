#!/bin/bash
set -e
cd /tmp/exp2
export PATH=/work/main/.venv/bin:$PATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRACETUNE_PII_KEY=exp
for t in simulate ingest validate_raw curate split validate_curated; do echo "== $t $(date +%T)"; python -m tasks.$t; done
echo "== base_model $(date +%T)"; python -m tasks.base_model
echo "== sft $(date +%T)"; python -m tasks.sft
echo "== eval sft $(date +%T)"; python -m tasks.evaluate sft
echo "== eval base $(date +%T)"; python -m tasks.evaluate base
echo "== done $(date +%T)"
