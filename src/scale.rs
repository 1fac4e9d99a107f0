//! TEMPORARY stub until the scale branch lands.
use std::time::Duration;
pub struct ScaleParams { pub min: u32, pub max: u32, pub interval: Duration, pub cooldown: Duration, pub window: Duration, pub cpu_guard: bool }
pub struct Sample { pub queued: Option<u32>, pub cpu_busy: Option<f64> }
pub struct PoolView { pub target: u32, pub alive: u32, pub ready: u32, pub starting: u32 }
pub struct Decision { pub from: u32, pub to: u32, pub reason: String }
pub struct Scaler { last: Option<Decision> }
impl Scaler {
    pub fn new(_p: ScaleParams) -> Self { Scaler { last: None } }
    pub fn set_params(&mut self, _p: ScaleParams) {}
    pub fn tick(&mut self, _now: Duration, _s: Sample, _p: PoolView) -> Option<Decision> { None }
    pub fn last_decision(&self) -> Option<&Decision> { self.last.as_ref() }
}
