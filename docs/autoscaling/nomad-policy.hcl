# Nomad job "web", group "web": each allocation runs droved with
# pool.max = 4 and pool.min = 1 (instance name "web"). The Nomad
# autoscaler reads this scaling block; its agent needs the prometheus APM
# plugin (nomad-autoscaler.hcl). Recipe from drove's docs/autoscaling.md.
job "web" {
  group "web" {
    count = 1

    scaling {
      enabled = true
      min     = 1
      max     = 20

      policy {
        evaluation_interval = "15s"
        cooldown            = "1m"

        check "drove_demand" {
          source = "prometheus"
          # The workers one allocation wants, on average.
          query = "avg(drove_workers_demand{pool=\"web\"})"

          # count = ceil(count * query / 3): about 3 of each allocation's 4
          # workers busy, 1 kept for bursts. Keep it above pool.min.
          strategy "target-value" {
            target = 3
          }
        }
      }
    }

    # task "droved" { ... } as usual
  }
}
