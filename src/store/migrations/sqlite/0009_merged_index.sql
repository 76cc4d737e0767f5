-- Tombstones by survivor: a merge repoints every earlier tombstone of the absorbed customer,
-- and a customer's merge history lists the customers merged into it. Few rows have one.
CREATE INDEX customers_merged_into ON customers(merged_into) WHERE merged_into IS NOT NULL;
