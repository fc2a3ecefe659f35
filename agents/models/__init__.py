"""Model calls: the routing policy, the router and the providers it routes between."""
