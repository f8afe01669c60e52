#!/usr/bin/env bash
# The offline quick start, in one command: English text and a WordPiece tokenizer built from CPython's own
# documentation (no download), sentence pairs made from it, then a tiny BERT pretrained on them (masked-LM +
# next-sentence prediction) in float32 with the ipu_config.json next to this file, evaluated before and
# after training. It ends with a table of what the model learned and where the model and its training
# curves are.
#
# Run again, it reuses the text, the tokenizer and the pairs; an interrupted training resumes. After a
# finished one it trains afresh (the finished run is moved to quickstart/output/overwritten-<time>/).
# QUICKSTART_MAX_STEPS shortens the training (the tests run it with fewer steps).
set -euo pipefail
cd "$(dirname "$0")"
max_steps="${QUICKSTART_MAX_STEPS:-3000}"

# 1. Text and tokenizer (built once, identical on every machine)
python -m ipu_trainer.cli.offline_assets quickstart

# 2. Sentence pairs: 20 passes over the documents, each with its own pairs and masks (built once)
if [ ! -f quickstart/pairs-64/prepare_dataset.json ]; then
  python prepare_dataset.py --tokenizer_name quickstart/tokenizer --train_file quickstart/train.txt \
    --validation_file quickstart/validation.txt --max_seq_length 64 --dupe_factor 20 \
    --output_dir quickstart/pairs-64
fi

# 3. Pretraining: the 16-IPU config's pipeline and replicas overridden to fit one CPU
python run_pretraining.py --model_type bert --config_overrides "vocab_size=2000,hidden_size=128,num_hidden_layers=2,\
num_attention_heads=4,intermediate_size=512,max_position_embeddings=128,hidden_dropout_prob=0,attention_probs_dropout_prob=0" \
  --tokenizer_name quickstart/tokenizer --dataset_path quickstart/pairs-64 --max_seq_length 64 --ipu_config_name . \
  --ipu_config_overrides "layers_per_ipu=[-1],ipus_per_replica=1,replication_factor=1,gradient_accumulation_steps=1,recompute_checkpoint_every_layer=false" \
  --per_device_train_batch_size 32 --per_device_eval_batch_size 64 --max_steps "$max_steps" --learning_rate 1e-3 \
  --warmup_ratio 0.1 --fp32 --do_train --do_eval --eval_on_start --logging_steps 100 \
  --output_dir quickstart/output --overwrite_output_dir

# 4. What it learned
python -m ipu_trainer.cli.run_summary quickstart/output
