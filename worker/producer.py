"""`from worker.producer import enqueue`, the documented way for a producer to hand over
messages, keeps working: the intake itself is worker/flows/producer.py."""

from worker.flows.campaigns import CampaignCancelled as CampaignCancelled
from worker.flows.producer import EnqueueResult as EnqueueResult
from worker.flows.producer import enqueue as enqueue
