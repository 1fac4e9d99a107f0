# The Nomad autoscaler agent's config: the prometheus APM plugin that
# nomad-policy.hcl's check names as its source.
nomad {
  address = "http://127.0.0.1:4646"
}

apm "prometheus" {
  driver = "prometheus"
  config = {
    address = "http://prometheus.service.consul:9090"
  }
}

strategy "target-value" {
  driver = "target-value"
}
