
spiffe://bank.internal/payments{"keys":[]} 