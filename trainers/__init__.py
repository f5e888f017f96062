"""nnU-Net-discoverable trainers. Point ``nnUNet_extTrainer`` at this folder (``nnunet_fed trainer-path``)."""
