"""What is trained and on which loss: pretrain, probe, finetune, distill."""
