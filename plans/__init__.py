"""Federated planning: site fingerprint summaries, merging, and the federated experiment planner.

Modules (import them directly; this package imports nothing heavy on its own):

* :mod:`nnunet_fed.plans.summary` - site side: ``summarize_site`` (nnU-Net fingerprint kept local, shareable
  aggregate summary, optional differential privacy);
* :mod:`nnunet_fed.plans.merge` - server side: ``merge_summaries`` (validation + merged fingerprint);
* :mod:`nnunet_fed.plans.planner` - ``FederatedExperimentPlanner`` (nnU-Net's ExperimentPlanner on the merged
  fingerprint, plans identifier ``nnUNetFedPlans``) and ``plan_federation``;
* :mod:`nnunet_fed.plans.preprocess` - site side: ``preprocess_site`` (install the shared plans, run nnU-Net's
  preprocessing);
* :mod:`nnunet_fed.plans.federated_planning` - ``run_federated_planning`` (all three steps, round 0 of
  ``nnunet_fed simulate --federated-planning``);
* :mod:`nnunet_fed.plans.cli` - ``add_planning_commands`` (``nnunet_fed site fingerprint|preprocess``,
  ``nnunet_fed plan``);
* :mod:`nnunet_fed.plans.sketch` - the mergeable log-bucketed histogram used in the summaries.
"""
