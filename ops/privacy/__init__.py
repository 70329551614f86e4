"""Data protection: what gatewatch does with a person's data after it is stored.

- ``gdpr``: find, erase (`gatewatch forget`) and export (`gatewatch export`) everything held
  about one user, in every store and region, the recovery snapshots and the vault.
- ``retention``: delete raw Parquet, audit months and vault days past their age.
- ``audit``: the access audit every data command writes before it runs (`gatewatch audit`).
- ``vault``: reading and rotating the sealed original text (`gatewatch vault`).
"""
