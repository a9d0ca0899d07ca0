"""Helpers shared by the test suites: toy data and shards, tiny models, multi-process ranks, drills.

`toydata`, `fixtures_images`, `shardgen`: data on disk (images, planted-fault shards);
`finetune_fixtures`: a tiny pretrained run and shards for the fine-tune tests; `toymodel`,
`multiproc`: a tiny model and N real gloo ranks; `drills`, `inproc`: the reliability drills' runs.
"""
